//! The one `ProxyHttp` implementation, for both directions
//! ([`Direction`] says which side a listener serves). Each phase is a
//! short sequence of stage calls; the stages live with their concern:
//!
//! ```text
//! request_filter:  trace begin → edge check (framing, header size, Host)
//!                  → identity (inbound) | route select, own certificate (outbound)
//!                  → policy check → resilience admit → refuse, or go on
//! upstream_peer:   attempt span → backoff, deadline, endpoint pick → peer
//! after an attempt: record its outcome → retry or answer
//! fail_to_proxy:   the rescue table → the refusal
//! logging:         idempotent response kept → span → tap, metrics, access log
//! ```
//!
//! Every refusal a stage returns is written by [`respond`].

mod ctx;
mod log;
pub(crate) mod resilience;
mod respond;
mod series;
mod span;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use crank_api::proxy::AppProtocol;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

pub use ctx::Ctx;
pub use upstream::{is_grpc, wants_h2c};

pub use crate::direction::Direction;
use crate::errors::{classify, Reason, Refusal};
use crate::headers::{CAPABILITY_HEADER, ERROR_HEADER};
use crate::policy::facts::Parties;
use crate::runtime::Runtime;
use crate::{framing, identity, policy, routing};
use resilience::admit::Stop;

pub struct MeshProxy {
    pub direction: Direction,
    pub rt: Arc<Runtime>,
    /// Inbound only: the app and how to speak to it.
    pub app: Option<(SocketAddr, AppProtocol)>,
}

#[async_trait]
impl ProxyHttp for MeshProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(self.rt.health.track())
    }

    /// No HTTP modules: Pingora's default registers a disabled response
    /// compression module, built per request with four allocations (issue
    /// #19); the mesh never compresses.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    /// The first phase after the head is parsed: the head deadline stops
    /// here, so nothing a later phase writes is taken for Pingora's own
    /// parse-error answer.
    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        crate::conn::head_received(session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Pipelined HTTP/1.1 requests are served in order (RFC 9112 §9.3.2)
        // instead of dropped after the first response.
        session.as_downstream_mut().set_pipelining_enabled(true);
        self.begin_trace(session, ctx);
        if let Err(r) = self.checks(session, ctx) {
            self.refuse(session, ctx, r).await;
            return Ok(true);
        }
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            Err(Stop::Refused(r)) => {
                self.respond(session, ctx, r).await;
                Ok(true)
            }
            Err(Stop::Answered) => Ok(true),
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if self.direction == Direction::Outbound {
            self.next_attempt_span(session, ctx);
        }
        self.peer(session, ctx).await
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.next_hop_headers(req, ctx)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if self.direction == Direction::Outbound {
            self.on_upstream_status(session, ctx, resp)?;
            ctx.peer_error = peer_error(resp);
        }
        Ok(())
    }

    /// Outbound, new or pooled: refuses a peer whose certificate serial is
    /// on the deny list before the request is sent on the connection.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.fresh_upstream = !reused;
        if self.direction == Direction::Outbound {
            let rt = &self.rt;
            // The mesh's deny list is about mesh certificates only.
            if ctx.route.as_ref().is_none_or(|r| r.egress.is_none()) {
                identity::admit::outbound_peer(digest, reused, ctx.upstream, &rt.tls, &rt.metrics)?;
            }
            self.attempt_sent(ctx);
        }
        Ok(())
    }

    /// A connect or TLS failure to an endpoint of an outbound route counts
    /// against it, and is retried on another endpoint under the route's
    /// retry policy and budget: nothing was sent, so any method is safe.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if self.direction == Direction::Outbound {
            self.record_attempt(ctx, false, false);
            if self.may_retry(session, ctx, crate::resilience::retry::Failure::Connect) {
                let reason = crate::errors::refine(classify(&e), self.direction, true);
                ctx.retried_because = Some(reason.as_str().into());
                tracing::warn!(reason = reason.as_str(), upstream = ?ctx.upstream, attempt = ctx.attempts, "connect to endpoint failed; retrying on another endpoint");
                e.set_retry(true);
            }
        }
        e
    }

    /// A failure while proxying: outbound, the attempt counts against the
    /// endpoint and may be retried (see `resilience::flow`). Otherwise
    /// Pingora's rule: a request on a reused connection that died is sent
    /// again if its method is idempotent and its body is still held.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if self.direction == Direction::Outbound && self.on_attempt_error(session, ctx, &mut e) {
            return e;
        }
        if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
            || session.response_written().is_some()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let refusal = self.failure(e, ctx);
        let reason = refusal.reason;
        self.count_failure(reason, ctx);
        tracing::warn!(direction = self.direction.as_str(), reason = reason.as_str(), error = %e, "request failed");
        // Pingora does not reuse a downstream connection after a failed
        // proxy attempt: say so in the response (`Connection: close`) so
        // the client does not send its next request into a closing socket.
        session.set_keepalive(None);
        let code = if session.response_written().is_none() && reason != Reason::ClientClosed {
            let status = refusal.status();
            self.respond(session, ctx, refusal).await;
            status
        } else {
            ctx.reason = Some(reason);
            0
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.on_request_body(body, ctx);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.on_response(resp, ctx);
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        self.check_deadline_mid_body(ctx, end_of_stream)?;
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        self.on_response_body(body, ctx);
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if session.is_body_done() {
            crate::conn::request_done(session);
        } else {
            // Pingora would drain the unread request body before reusing
            // the connection, with no deadline: close it instead.
            session.set_keepalive(None);
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.finish_idempotency(ctx, e.is_none() && status > 0);
        self.finish_span(session, ctx, status, e.map(|e| e.etype().as_str()));
        self.log_request(session, ctx, status, e);
    }
}

impl MeshProxy {
    /// The checks before resilience: edge, identity or route, policy.
    fn checks(&self, session: &Session, ctx: &mut Ctx) -> std::result::Result<(), Refusal> {
        let raw = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        framing::check_head(
            raw.as_deref(),
            session.req_header(),
            self.max_header_bytes(),
        )?;
        match self.direction {
            Direction::Inbound => {
                let (peer, refusal) =
                    identity::admit::inbound_peer(session.as_downstream().digest(), &self.rt.tls);
                ctx.peer = peer;
                refusal.map_or(Ok(()), Err)?;
            }
            Direction::Outbound => {
                let port = session
                    .as_downstream()
                    .server_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.port());
                let pushed_to = self.rt.pushed_routes.then_some(self.rt.me.service.as_str());
                let table = self.rt.routes.load();
                ctx.route = Some(match routing::captured::captured_dst(session) {
                    Some(dst) => routing::captured::select(&table, dst)?,
                    None => {
                        let req = session.req_header();
                        let selected = routing::select::select(&table, port, req, pushed_to);
                        routing::select::count_undeclared(&table, &selected, &self.rt.metrics);
                        selected?
                    }
                });
                identity::admit::own_cert(&self.rt.health, &self.rt.me.spiffe_id)?;
            }
        }
        self.check_policy(session, ctx)
    }

    /// The header list a request may carry: the edge limit, plus (inbound)
    /// what a calling sidecar adds (traceparent, x-crank-capability, ...).
    fn max_header_bytes(&self) -> usize {
        self.rt.config.load().limits.max_request_header_bytes
            + match self.direction {
                Direction::Inbound => crank_api::proxy::SIDECAR_HEADER_HEADROOM,
                Direction::Outbound => 0,
            }
    }

    /// The direction's policy set, when there is one.
    fn check_policy(&self, session: &Session, ctx: &mut Ctx) -> std::result::Result<(), Refusal> {
        let Some(handle) = self.rt.policies.for_direction(self.direction) else {
            return Ok(());
        };
        let req = session.req_header();
        let client = session
            .as_downstream()
            .client_addr()
            .and_then(|a| a.as_inet())
            .copied();
        let trace_id = ctx.trace_id();
        let parties = self.parties(req, ctx);
        let facts = |m: &crank_policy::Manifest| {
            policy::facts::request_facts(self.direction, req, client, parties, m)
        };
        let egress = match self.direction {
            Direction::Outbound => Some(ctx.route.as_ref().and_then(|r| r.egress.clone())),
            Direction::Inbound => None,
        };
        let extend = |doc: &mut serde_json::Value| {
            if let Some(e) = egress {
                policy::facts::egress_input(doc, e.as_deref());
            }
        };
        let checked = policy::check::check_with(
            &self.rt.policies,
            handle,
            facts,
            extend,
            trace_id.as_deref(),
            &self.rt.metrics,
        );
        ctx.policy = Some((checked.decision_id, checked.label));
        checked.refusal.map_or(Ok(()), Err)
    }

    /// Who the request is between, for policy input.
    fn parties(&self, req: &RequestHeader, ctx: &Ctx) -> Parties {
        let me = self.rt.me.clone();
        match self.direction {
            Direction::Inbound => Parties {
                source: ctx.peer.as_ref().map(|p| crank_policy::Workload {
                    spiffe_id: p.spiffe_id.clone(),
                    service: p.service.clone(),
                    tenant: p.tenant.clone(),
                    trust_domain: p.trust_domain.clone(),
                }),
                destination: me,
                capability: self.inbound_capability(req),
                route: None,
            },
            Direction::Outbound => Parties {
                source: Some(me),
                destination: ctx
                    .route
                    .as_ref()
                    .filter(|r| r.egress.is_none())
                    .and_then(|r| r.single_identity())
                    .map(crank_policy::Workload::from)
                    .unwrap_or_default(),
                capability: ctx.route.as_ref().and_then(|r| r.capability.clone()),
                route: ctx.route.as_ref().map(|r| r.name.clone()),
            },
        }
    }

    /// The capability an inbound request is for (see [`inbound_capability`]).
    pub(crate) fn inbound_capability(&self, req: &RequestHeader) -> Option<String> {
        inbound_capability(
            self.rt
                .config
                .load()
                .inbound
                .as_ref()
                .and_then(|i| i.capability.as_deref()),
            claimed_capability(req),
        )
    }

    /// The counters of a failed request: timeouts, an open circuit, a
    /// failed handshake to a peer.
    fn count_failure(&self, reason: Reason, ctx: &Ctx) {
        if reason == Reason::RequestTimeout {
            self.count_timeout(ctx);
        }
        if reason == Reason::CircuitOpen {
            self.count_shed(ctx, "circuit-open");
        }
        let tls_reason = match reason {
            Reason::TlsIdentityMismatch => "identity-mismatch",
            Reason::UpstreamTlsFailed => "tls-failed",
            _ => return,
        };
        self.rt
            .metrics
            .handshake_failures
            .with_label_values(&["outbound", tls_reason])
            .inc();
    }
}

/// Outbound: the peer sidecar's `x-crank-error`, when it answered by itself.
fn peer_error(resp: &ResponseHeader) -> Option<String> {
    resp.headers
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
        .map(|v| format!("peer:{v}"))
}

/// The capability the caller claims (`x-crank-capability`), as sent.
pub(crate) fn claimed_capability(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(CAPABILITY_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// The capability an inbound request is for. When the config names the one
/// capability this app serves, that is authoritative: a peer claiming
/// another (to reach a capability shared across tenants, say) does not
/// change it. Otherwise the caller's sidecar's claim is used.
pub fn inbound_capability(configured: Option<&str>, claimed: Option<&str>) -> Option<String> {
    configured.or(claimed).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_capability_wins_over_the_callers_claim() {
        assert_eq!(
            inbound_capability(Some("transcode:v1"), Some("auth.introspect:v1")).as_deref(),
            Some("transcode:v1")
        );
        assert_eq!(
            inbound_capability(None, Some("transcode:v1")).as_deref(),
            Some("transcode:v1")
        );
        assert_eq!(inbound_capability(None, None), None);
    }
}
