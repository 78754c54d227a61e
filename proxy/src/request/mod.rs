//! The one `ProxyHttp` implementation. Each phase is a few lines that call
//! the module owning the concern (routing, identity, framing, errors,
//! metrics). `Direction` says which side of the sidecar a listener is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod resilience;

use async_trait::async_trait;
use bytes::Bytes;
use crank_api::proxy::AppProtocol;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::errors::{classify, Reason};
use crate::framing;
use crate::health::InflightGuard;
use crate::identity::{ConnAuth, PeerAuth, PeerIdentity};
use crate::metrics::status_class;
use crate::policy::{new_decision_id, PolicyHandle};
use crate::routing::Route;
use crate::runtime::Runtime;
use crate::spans::{Hop, SpanEnd};

pub use crate::direction::Direction;
pub use crate::headers::*;

pub struct MeshProxy {
    pub direction: Direction,
    pub rt: Arc<Runtime>,
    /// Inbound only: the app and how to speak to it.
    pub app: Option<(SocketAddr, AppProtocol)>,
}

/// Per-request state.
pub struct Ctx {
    pub(crate) start: Instant,
    pub(crate) route: Option<Arc<Route>>,
    pub(crate) peer: Option<Arc<PeerIdentity>>,
    pub(crate) upstream: Option<SocketAddr>,
    /// Whether the upstream connection was new (not from the pool).
    pub(crate) fresh_upstream: bool,
    /// Upstream attempts started (retries after a failed connect add one).
    pub(crate) attempts: usize,
    /// Why the last attempt failed, when it was retried.
    pub(crate) retried_because: Option<std::borrow::Cow<'static, str>>,
    pub(crate) reason: Option<Reason>,
    /// The policy decision: id and result, for the access log.
    pub(crate) policy: Option<(String, &'static str)>,
    /// This hop's trace context and span, when tracing is on.
    pub(crate) hop: Option<Hop>,
    /// The caller's trace id when tracing is off (logs only).
    pub(crate) incoming_trace_id: Option<String>,
    /// Outbound: the identity the chosen endpoint must prove.
    pub(crate) endpoint_identity: Option<String>,
    /// Outbound: the peer sidecar's `x-crank-error`, when it answered by
    /// itself (its policy denied the request, say).
    pub(crate) peer_error: Option<String>,
    /// Quota, concurrency slot, retries, deadline, idempotency.
    pub(crate) res: resilience::ResCtx,
    _inflight: InflightGuard,
}

impl Ctx {
    pub(crate) fn route_label(&self, dir: Direction) -> &str {
        match (&self.route, dir) {
            (Some(r), _) => &r.name,
            (None, Direction::Inbound) => "app",
            (None, Direction::Outbound) => "none",
        }
    }

    /// The request's trace id: this hop's, or the caller's when tracing is off.
    fn trace_id(&self) -> Option<String> {
        match &self.hop {
            Some(h) => Some(h.trace_id_hex()),
            None => self.incoming_trace_id.clone(),
        }
    }
}

#[async_trait]
impl ProxyHttp for MeshProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            route: None,
            peer: None,
            upstream: None,
            fresh_upstream: false,
            attempts: 0,
            retried_because: None,
            reason: None,
            policy: None,
            hop: None,
            incoming_trace_id: None,
            endpoint_identity: None,
            peer_error: None,
            res: Default::default(),
            _inflight: self.rt.health.track(),
        }
    }

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
        let headers = &session.req_header().headers;
        match &self.rt.tracer {
            Some(t) => ctx.hop = Some(t.begin(headers)),
            None => ctx.incoming_trace_id = crate::spans::incoming_trace_id(headers),
        }
        if let Some(h1) = session.as_downstream().as_http1() {
            if let Err(fe) = framing::check_raw_header(&h1.get_headers_raw_bytes()) {
                self.refuse(session, ctx, Reason::BadFraming, fe.detail())
                    .await;
                return Ok(true);
            }
        }
        // Inbound takes what a calling sidecar's edge let through plus what
        // that sidecar added (traceparent, x-crank-capability, ...).
        let max_header_bytes = self.rt.config.load().limits.max_request_header_bytes
            + match self.direction {
                Direction::Inbound => crank_api::proxy::SIDECAR_HEADER_HEADROOM,
                Direction::Outbound => 0,
            };
        if let Some((reason, detail)) = edge_refusal(session.req_header(), max_header_bytes) {
            self.refuse(session, ctx, reason, &detail).await;
            return Ok(true);
        }
        match self.direction {
            Direction::Inbound => match peer_auth(session) {
                Ok(peer) if self.rt.tls.is_revoked(&peer.serial) => {
                    let detail = format!("serial {}", peer.serial);
                    ctx.peer = Some(peer);
                    self.refuse(session, ctx, Reason::PeerCertRevoked, &detail)
                        .await;
                    return Ok(true);
                }
                Ok(peer) => ctx.peer = Some(peer),
                Err(reason) => {
                    self.refuse(session, ctx, reason, "").await;
                    return Ok(true);
                }
            },
            Direction::Outbound => {
                let port = session
                    .as_downstream()
                    .server_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.port());
                let host = request_authority(session.req_header());
                let table = self.rt.routes.load();
                let path = session.req_header().uri.path().to_string();
                match table.select_path(port, host.as_deref(), &path) {
                    Ok(route) => ctx.route = Some(route),
                    Err(nr) => {
                        let mut detail = format!(
                            "host {:?}; known routes: {}",
                            nr.host.unwrap_or_default(),
                            table.names().join(", ")
                        );
                        if self.rt.pushed_routes {
                            // The route may exist and leave this service
                            // out: crank-control sends a proxy only the
                            // routes whose `clients` name its service.
                            let svc = &self.rt.me.service;
                            detail.push_str(&format!("; crank-control sends this sidecar only the routes whose clients list is empty or names service {svc:?}: if the route exists, add {svc:?} to its clients (`crankctl routes` lists them)"));
                        }
                        self.refuse(session, ctx, Reason::NoRoute, &detail).await;
                        return Ok(true);
                    }
                }
                // A revoked or expired own certificate is refused by every
                // peer: answer with the local cause, not a peer's refusal.
                if let Some(problem) = self.rt.health.own_cert_problem(crate::clock::unix_now()) {
                    let reason = match problem {
                        "cert-revoked" => Reason::OwnCertRevoked,
                        _ => Reason::OwnCertExpired,
                    };
                    let detail = format!("identity {}", self.rt.me.spiffe_id);
                    self.refuse(session, ctx, reason, &detail).await;
                    return Ok(true);
                }
            }
        }
        if let Some(handle) = self.rt.policies.for_direction(self.direction) {
            if !self.check_policy(session, ctx, handle).await {
                return Ok(true);
            }
        }
        if !self.admit(session, ctx).await {
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if self.direction == Direction::Outbound {
            // Each upstream attempt is its own client span.
            if let Some(t) = &self.rt.tracer {
                let retried = ctx
                    .hop
                    .as_ref()
                    .filter(|h| h.attempts >= 1 && t.records(h))
                    .map(|_| {
                        let why = ctx.retried_because.clone();
                        self.span_end(session, ctx, 0, Some(why.as_deref().unwrap_or("retried")))
                    });
                if let Some(hop) = ctx.hop.as_mut() {
                    t.next_attempt(hop, retried);
                }
            }
        }
        let timeouts = self.rt.config.load().timeouts.clone();
        let mut peer = match self.direction {
            Direction::Inbound => {
                let (addr, proto) = self.app.ok_or_else(|| {
                    Error::explain(ErrorType::InternalError, "inbound without app")
                })?;
                let mut peer = HttpPeer::new(addr, false, String::new());
                if wants_h2c(proto, session.req_header()) {
                    peer.options.set_http_version(2, 2);
                    peer.options.max_h2_streams = 128;
                } else {
                    peer.options.set_http_version(1, 1);
                }
                peer
            }
            Direction::Outbound => {
                let route = ctx
                    .route
                    .clone()
                    .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
                let idx = self.next_endpoint(ctx, &route).await?;
                let ep = &route.endpoints[idx];
                ctx.endpoint_identity = Some(ep.identity.spiffe_id());
                let mut peer = HttpPeer::new(ep.address, true, ep.server_name.clone());
                peer.client_cert_key = Some(self.rt.tls.client_cert());
                peer.options.ca = Some(self.rt.tls.bundle());
                // Pingora's pool key covers the client cert but not the
                // roots: a new root or deny-list generation starts a new pool.
                peer.group_key = self.rt.tls.pool_key(&ep.address);
                if session.is_upgrade_req() {
                    // WebSocket and other upgrades need HTTP/1.1 between sidecars.
                    peer.options.set_http_version(1, 1);
                } else {
                    peer.options.set_http_version(2, 1);
                    peer.options.max_h2_streams = 128;
                }
                peer
            }
        };
        let connect = self.attempt_timeout(ctx, timeouts.connect);
        peer.options.connection_timeout = Some(connect);
        peer.options.total_connection_timeout = Some(connect);
        peer.options.read_timeout = Some(self.attempt_timeout(ctx, timeouts.upstream_read));
        peer.options.write_timeout = peer.options.read_timeout;
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        ctx.upstream = peer.address().as_inet().copied();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        req.remove_header(CLIENT_ID_HEADER);
        if let Some(hop) = &ctx.hop {
            // This hop takes part in the trace: the next hop's parent is
            // this span. Without tracing the headers pass untouched.
            req.insert_header("traceparent", hop.traceparent())?;
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
                to_origin_form(req)?;
                req.remove_header(CAPABILITY_HEADER);
                if let Some(cap) = ctx.route.as_ref().and_then(|r| r.capability.as_deref()) {
                    req.insert_header(CAPABILITY_HEADER, cap)?;
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if self.direction == Direction::Outbound {
            self.on_upstream_status(session, ctx, resp)?;
        }
        if self.direction == Direction::Outbound {
            ctx.peer_error = resp
                .headers
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
                .map(|v| format!("peer:{v}"));
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
            self.refuse_revoked_peer(digest, reused, ctx)?;
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
                let reason = refine(classify(&e), self.direction, true);
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
        let reason = self
            .resilience_reason(e, ctx)
            .unwrap_or_else(|| refine(classify(e), self.direction, ctx.fresh_upstream));
        if reason == Reason::RequestTimeout {
            self.count_timeout(ctx);
        }
        if reason == Reason::CircuitOpen {
            self.count_shed(ctx, "circuit-open");
        }
        if let Some(tls_reason) = outbound_handshake_reason(reason) {
            self.rt
                .metrics
                .handshake_failures
                .with_label_values(&["outbound", tls_reason])
                .inc();
        }
        tracing::warn!(direction = self.direction.as_str(), reason = reason.as_str(), error = %e, "request failed");
        // Pingora does not reuse a downstream connection after a failed
        // proxy attempt: say so in the response (`Connection: close`) so
        // the client does not send its next request into a closing socket.
        session.set_keepalive(None);
        let code = if session.response_written().is_none() && reason != Reason::ClientClosed {
            let mut detail = upstream_detail(ctx);
            if reason == Reason::TlsIdentityMismatch {
                // Name both identities: what the route expects and what
                // the peer's certificate presented.
                let text = e.to_string();
                if let Some(m) =
                    crate::identity::mismatch_detail(&text, ctx.endpoint_identity.as_deref())
                {
                    detail = if detail.is_empty() {
                        m
                    } else {
                        format!("{detail}; {m}")
                    };
                }
            }
            match self.retry_after_for(reason, ctx) {
                Some(secs) => {
                    let ra = secs.to_string();
                    self.respond_extra(session, ctx, reason, &detail, &[("retry-after", &ra)])
                        .await
                }
                None => self.respond(session, ctx, reason, &detail).await,
            }
            reason.status()
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
        if let (Some(t), Some(hop)) = (&self.rt.tracer, &ctx.hop) {
            if t.records(hop) {
                let err = e.map(|e| e.etype().as_str());
                t.finish(hop, self.span_end(session, ctx, status, err));
            }
        }
        let dir = self.direction.as_str();
        let route = ctx.route_label(self.direction).to_string();
        let elapsed = ctx.start.elapsed();
        if self.rt.tap.active() {
            self.rt
                .tap
                .publish(self.tap_event(session, ctx, status, elapsed));
        }
        let m = &self.rt.metrics;
        m.requests
            .with_label_values(&[dir, &route, status_class(status)])
            .inc();
        m.latency
            .with_label_values(&[dir, &route])
            .observe(elapsed.as_secs_f64());
        if self.rt.access_log {
            let req = session.req_header();
            tracing::info!(
                target: "crank::access",
                direction = dir,
                route = %route,
                method = %req.method,
                path = req.uri.path(),
                status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                protocol = ?req.version,
                upstream = ctx.upstream.map(|a| a.to_string()),
                peer = ctx.peer.as_ref().map(|p| p.spiffe_id.as_str()),
                crank_error = ctx.reason.map(|r| r.as_str()),
                answered_by = answered_by(ctx),
                error_origin = error_origin(ctx, self.direction),
                retries = ctx.res.retries,
                policy = ctx.policy.as_ref().map(|p| p.1),
                decision_id = ctx.policy.as_ref().map(|p| p.0.as_str()),
                error = e.map(|e| e.to_string()),
                trace_id = ctx.trace_id(),
                span_id = ctx.hop.as_ref().map(|h| h.span_id_hex()),
            );
        }
    }
}

impl MeshProxy {
    /// Evaluates the direction's policy set. Returns false when the request
    /// was refused (and answered).
    async fn check_policy(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        handle: &PolicyHandle,
    ) -> bool {
        // One revision for the whole check, even if a reload lands meanwhile.
        let set = handle.current();
        let facts = self.request_facts(session, ctx, set.manifest());
        let trace_id = ctx.trace_id();
        let d = self
            .rt
            .policies
            .check(handle, &set, &facts, trace_id.as_deref(), &self.rt.metrics);
        let label = match (d.outcome, d.permitted) {
            (crank_policy::Outcome::Allow, _) => "allow",
            (crank_policy::Outcome::Deny, false) => "deny",
            (crank_policy::Outcome::Deny, true) => "audit-deny",
            (crank_policy::Outcome::Error, false) => "error",
            (crank_policy::Outcome::Error, true) => "error-allowed",
        };
        ctx.policy = Some((facts.id.clone(), label));
        if d.permitted {
            return true;
        }
        let reason = match d.outcome {
            crank_policy::Outcome::Error => Reason::PolicyError,
            _ => Reason::PolicyDenied,
        };
        let reasons: Vec<&str> = match d.outcome {
            // The error itself (a timeout, a conflict in a rule) is for the
            // decision log, not for the caller.
            crank_policy::Outcome::Error => vec!["policy evaluation failed"],
            _ => d.reasons.iter().map(String::as_str).collect(),
        };
        tracing::warn!(
            direction = self.direction.as_str(),
            reason = reason.as_str(),
            decision_id = %facts.id,
            revision = %set.revision(),
            "refused request by policy"
        );
        let body = serde_json::json!({
            "error": reason.as_str(),
            "message": reason.advice(),
            "decision_id": facts.id,
            "revision": set.revision(),
            "reasons": reasons,
            "trace_id": trace_id,
        });
        let mut body = serde_json::to_vec(&body).unwrap_or_default();
        body.push(b'\n');
        self.respond_with(
            session,
            ctx,
            reason,
            "application/json",
            body,
            &[(DECISION_HEADER, facts.id.as_str())],
        )
        .await;
        false
    }

    /// The span for this hop (or upstream attempt): OpenTelemetry HTTP
    /// semantic conventions plus `crank.*` attributes. `failure` is a
    /// transport error type, or why an attempt ended early.
    fn span_end(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        failure: Option<&str>,
    ) -> SpanEnd {
        use opentelemetry::trace::SpanKind;
        use opentelemetry::KeyValue as Kv;
        let req = session.req_header();
        let mut a: Vec<Kv> = Vec::with_capacity(24);
        let name = crate::spans::method_attrs(req.method.as_str(), &mut a);
        let kind = match self.direction {
            Direction::Inbound => SpanKind::Server,
            Direction::Outbound => SpanKind::Client,
        };
        a.push(Kv::new("network.protocol.name", "http"));
        if kind == SpanKind::Server {
            // The client span's wire is the sidecar-to-sidecar connection,
            // not the app's request; it is left out there.
            a.push(Kv::new(
                "network.protocol.version",
                match req.version {
                    http::Version::HTTP_2 => "2",
                    http::Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
            ));
        }
        let authority = request_authority(req);
        let path = match split_absolute(req.raw_path()) {
            Some((_, _, pq)) => pq.split('?').next().unwrap_or("").to_string(),
            None => req.uri.path().to_string(),
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        let downstream = session.as_downstream();
        let client = downstream.client_addr().and_then(|a| a.as_inet()).copied();
        match self.direction {
            Direction::Inbound => {
                a.push(Kv::new("url.scheme", "https"));
                a.push(Kv::new("url.path", path));
                if let Some(host) = &authority {
                    a.push(Kv::new("server.address", host_only(host).to_string()));
                }
                if let Some(local) = downstream.server_addr().and_then(|a| a.as_inet()) {
                    a.push(Kv::new("server.port", i64::from(local.port())));
                }
                if let Some(c) = client {
                    a.push(Kv::new("client.address", c.ip().to_string()));
                    a.push(Kv::new("network.peer.address", c.ip().to_string()));
                    a.push(Kv::new("network.peer.port", i64::from(c.port())));
                }
                if let Some(ua) = req
                    .headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                {
                    a.push(Kv::new("user_agent.original", ua.to_string()));
                }
            }
            Direction::Outbound => {
                a.push(Kv::new(
                    "url.full",
                    format!("http://{}{path}", authority.as_deref().unwrap_or("")),
                ));
                // server.* is the host the app asked for; network.peer.* the
                // peer sidecar actually reached.
                if let Some(host) = &authority {
                    a.push(Kv::new("server.address", host_only(host).to_string()));
                    let port = host[host_only(host).len()..]
                        .strip_prefix(':')
                        .and_then(|p| p.parse::<u16>().ok())
                        .unwrap_or(80);
                    a.push(Kv::new("server.port", i64::from(port)));
                }
                if let Some(up) = ctx.upstream {
                    a.push(Kv::new("network.peer.address", up.ip().to_string()));
                    a.push(Kv::new("network.peer.port", i64::from(up.port())));
                }
                if let Some(hop) = &ctx.hop {
                    if hop.attempts > 1 {
                        a.push(Kv::new(
                            "http.request.resend_count",
                            i64::from(hop.attempts - 1),
                        ));
                    }
                }
            }
        }
        if status > 0 {
            a.push(Kv::new("http.response.status_code", i64::from(status)));
        }
        a.push(Kv::new("crank.direction", self.direction.as_str()));
        a.push(Kv::new(
            "crank.route",
            ctx.route_label(self.direction).to_string(),
        ));
        let (capability, peer, tenant) = match self.direction {
            Direction::Inbound => (
                self.inbound_capability(req),
                ctx.peer.as_ref().map(|p| p.spiffe_id.clone()),
                ctx.peer.as_ref().map(|p| p.tenant.clone()),
            ),
            Direction::Outbound => (
                ctx.route.as_ref().and_then(|r| r.capability.clone()),
                ctx.endpoint_identity.clone(),
                Some(self.rt.me.tenant.clone()),
            ),
        };
        if let Some(c) = capability {
            a.push(Kv::new("crank.capability", c));
        }
        if let Some(p) = peer {
            a.push(Kv::new("crank.peer.identity", p));
        }
        if let Some(t) = tenant {
            a.push(Kv::new("crank.tenant", t));
        }
        if let Some((id, result)) = &ctx.policy {
            a.push(Kv::new("crank.decision", *result));
            a.push(Kv::new("crank.decision_id", id.clone()));
        }
        let answered_by = match (ctx.reason, &ctx.peer_error, status) {
            _ if ctx.res.answered_by.is_some() => {
                ctx.res.answered_by.unwrap_or_default().to_string()
            }
            (Some(r), _, _) => r.as_str().to_string(),
            (None, Some(peer), _) => peer.clone(),
            (None, None, 0) => "none".to_string(),
            (None, None, _) => "upstream".to_string(),
        };
        a.push(Kv::new("crank.answered_by", answered_by));
        if let Some(origin) = error_origin(ctx, self.direction) {
            a.push(Kv::new("crank.error.origin", origin));
        }
        // Semantic conventions: a server span fails on 5xx, a client span
        // on 4xx too; a request that got no response fails either way.
        let error_floor = match kind {
            SpanKind::Server => 500,
            _ => 400,
        };
        let error = match (ctx.reason, failure) {
            (_, Some(f)) if status == 0 => Some(f.to_string()),
            (Some(r), _) if r.status() >= error_floor || status == 0 => {
                Some(r.as_str().to_string())
            }
            (None, _) if status >= error_floor => Some(status.to_string()),
            (None, None) if status == 0 => Some("no-response".to_string()),
            _ => None,
        };
        if let Some(e) = &error {
            a.push(Kv::new("error.type", e.clone()));
        }
        SpanEnd {
            kind,
            name: name.into(),
            attributes: a,
            error,
            end: std::time::SystemTime::now(),
        }
    }

    /// The event `crankctl tap` sees for this request: no header values, no
    /// body, no query string.
    fn tap_event(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        elapsed: Duration,
    ) -> crate::tap::TapEvent {
        let req = session.req_header();
        let path = match split_absolute(req.raw_path()) {
            Some((_, _, pq)) => pq.split('?').next().unwrap_or("").to_string(),
            None => req.uri.path().to_string(),
        };
        let me = Some(self.rt.me.spiffe_id.clone());
        let (capability, source, destination) = match self.direction {
            Direction::Inbound => (
                self.inbound_capability(req),
                ctx.peer.as_ref().map(|p| p.spiffe_id.clone()),
                me,
            ),
            Direction::Outbound => (
                ctx.route.as_ref().and_then(|r| r.capability.clone()),
                me,
                ctx.endpoint_identity.clone(),
            ),
        };
        let crank_error = match (ctx.reason, &ctx.peer_error) {
            (Some(r), _) => Some(r.as_str().to_string()),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        crate::tap::TapEvent {
            ts_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            direction: self.direction.as_str(),
            route: ctx.route_label(self.direction).to_string(),
            capability,
            method: req.method.as_str().to_string(),
            path: if path.is_empty() { "/".into() } else { path },
            status,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            source,
            destination,
            trace_id: ctx.trace_id(),
            crank_error,
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
            req.headers
                .get(CAPABILITY_HEADER)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// What the policy input is built from.
    fn request_facts(
        &self,
        session: &Session,
        ctx: &Ctx,
        manifest: &crank_policy::Manifest,
    ) -> crank_policy::RequestFacts {
        let req = session.req_header();
        let me = self.rt.me.clone();
        // Copy only the headers the input or the decision log can show.
        let all_headers = manifest.input == crank_policy::InputShape::Envoy
            || manifest.headers.iter().any(|h| h == "*");
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (source, destination, capability, route) = match self.direction {
            Direction::Inbound => (
                ctx.peer.as_ref().map(|p| crank_policy::Workload {
                    spiffe_id: p.spiffe_id.clone(),
                    service: p.service.clone(),
                    tenant: p.tenant.clone(),
                    trust_domain: p.trust_domain.clone(),
                }),
                me,
                self.inbound_capability(req),
                None,
            ),
            Direction::Outbound => (
                Some(me),
                ctx.route
                    .as_ref()
                    .and_then(|r| r.single_identity())
                    .map(crank_policy::Workload::from)
                    .unwrap_or_default(),
                ctx.route.as_ref().and_then(|r| r.capability.clone()),
                ctx.route.as_ref().map(|r| r.name.clone()),
            ),
        };
        let path_and_query = match split_absolute(req.raw_path()) {
            Some((_, _, pq)) if pq.starts_with('/') => pq.to_string(),
            Some((_, _, pq)) => format!("/{pq}"),
            None => String::from_utf8_lossy(req.raw_path()).into_owned(),
        };
        crank_policy::RequestFacts {
            direction: self.direction.as_str(),
            source,
            source_address: session
                .as_downstream()
                .client_addr()
                .and_then(|a| a.as_inet())
                .copied(),
            destination,
            capability,
            route,
            method: req.method.as_str().to_string(),
            path_and_query,
            host: request_authority(req),
            scheme: match self.direction {
                Direction::Inbound => "https".into(),
                Direction::Outbound => "http".into(),
            },
            protocol: match req.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            }
            .into(),
            headers: req
                .headers
                .iter()
                .filter(|(k, _)| {
                    all_headers
                        || manifest
                            .headers
                            .iter()
                            .any(|w| w.eq_ignore_ascii_case(k.as_str()))
                })
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_size: header("content-length").and_then(|v| v.trim().parse().ok()),
            time: std::time::SystemTime::now(),
            id: new_decision_id(),
        }
    }

    /// Outbound: an error when the peer's certificate (from the TLS digest
    /// Pingora keeps per connection) is on the deny list. The connection's
    /// pool key is retired so it is not picked again.
    fn refuse_revoked_peer(
        &self,
        digest: Option<&pingora_core::protocols::Digest>,
        reused: bool,
        ctx: &Ctx,
    ) -> Result<()> {
        let serial = digest
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|s| s.serial_number.as_deref());
        let Some(serial) = serial.filter(|s| self.rt.tls.is_revoked(s)) else {
            return Ok(());
        };
        let serial = crank_api::identity::canonical_serial(serial);
        tracing::warn!(upstream = ?ctx.upstream, serial, reused, "refused peer sidecar: its certificate is revoked");
        if let Some(addr) = ctx.upstream {
            self.rt.tls.retire_pooled(addr);
        }
        // Counted here, once per refused connection: the request may still
        // succeed on another endpoint.
        self.rt
            .metrics
            .handshake_failures
            .with_label_values(&["outbound", "revoked"])
            .inc();
        Err(Error::explain(
            crate::errors::UPSTREAM_REVOKED,
            format!("the peer's certificate (serial {serial}) is revoked"),
        )
        .into_up())
    }

    /// Refuses a request before it reaches any upstream.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, reason: Reason, detail: &str) {
        tracing::warn!(
            direction = self.direction.as_str(),
            reason = reason.as_str(),
            detail,
            "refused request"
        );
        if matches!(
            reason,
            Reason::BadFraming
                | Reason::BadRequest
                | Reason::RequestHeaderTooLarge
                | Reason::ClientCertRequired
                | Reason::PeerIdentityInvalid
                | Reason::PeerCertRevoked
        ) {
            session.set_keepalive(None);
        }
        self.respond(session, ctx, reason, detail).await;
    }

    /// Keeps a policy denial or a shed request for the next traffic report
    /// to crank-control (only with `mesh`; never waits).
    fn note_refusal(&self, session: &Session, ctx: &Ctx, reason: Reason, status: u16) {
        let Some(refusals) = &self.rt.refusals else {
            return;
        };
        if !crate::mesh::report::is_reported(reason) {
            return;
        }
        let source = match self.direction {
            Direction::Inbound => ctx
                .peer
                .as_ref()
                .map(|p| format!("{}.{}.{}", p.service, p.tenant, p.trust_domain)),
            Direction::Outbound => {
                let me = &self.rt.me;
                Some(format!("{}.{}.{}", me.service, me.tenant, me.trust_domain))
            }
        };
        let req = session.req_header();
        refusals.push(crate::mesh::report::event(
            self.direction.as_str(),
            status,
            reason,
            ctx.route_label(self.direction),
            req.method.as_str(),
            req.uri.path(),
            source,
        ));
    }

    /// Writes the proxy's own response: status, `x-crank-error`, and a body
    /// saying what happened and what to do.
    pub(crate) async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reason: Reason,
        detail: &str,
    ) {
        self.respond_extra(session, ctx, reason, detail, &[]).await
    }

    /// [`Self::respond`] with extra headers (`Retry-After`, `RateLimit`).
    pub(crate) async fn respond_extra(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reason: Reason,
        detail: &str,
        extra: &[(&'static str, &str)],
    ) {
        let mut body = if detail.is_empty() {
            format!("{}: {}\n", reason.as_str(), reason.advice())
        } else {
            format!("{}: {} ({detail})\n", reason.as_str(), reason.advice())
        };
        if let Some(id) = ctx.trace_id() {
            body.push_str("trace_id: ");
            body.push_str(&id);
            body.push('\n');
        }
        self.respond_with(
            session,
            ctx,
            reason,
            "text/plain; charset=utf-8",
            body.into_bytes(),
            extra,
        )
        .await;
    }

    async fn respond_with(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reason: Reason,
        content_type: &str,
        body: Vec<u8>,
        extra: &[(&'static str, &str)],
    ) {
        ctx.reason = Some(reason);
        self.rt
            .metrics
            .proxy_errors
            .with_label_values(&[self.direction.as_str(), reason.as_str()])
            .inc();
        let status = ctx.res.status_override.unwrap_or(reason.status());
        self.note_refusal(session, ctx, reason, status);
        let Ok(mut resp) = ResponseHeader::build(status, Some(6 + extra.len())) else {
            return;
        };
        let _ = resp.insert_header(ERROR_HEADER, reason.as_str());
        let _ = resp.insert_header(ERROR_ORIGIN_HEADER, self.direction.as_str());
        let _ = resp.insert_header(ERROR_SIDECAR_HEADER, self.rt.me.spiffe_id.as_str());
        if let Some(id) = ctx.trace_id() {
            let _ = resp.insert_header(TRACE_ID_HEADER, id);
        }
        for (k, v) in extra {
            let _ = resp.insert_header(*k, *v);
        }
        let _ = resp.insert_header(http::header::CONTENT_TYPE, content_type);
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session
                .write_response_body(Some(Bytes::from(body)), true)
                .await;
        }
    }
}

/// The inbound peer's verified identity, or why it is refused.
fn peer_auth(session: &Session) -> std::result::Result<Arc<PeerIdentity>, Reason> {
    let auth = session
        .as_downstream()
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|ssl| ssl.extension.get::<ConnAuth>());
    match auth.map(|a| &a.auth) {
        Some(PeerAuth::Verified(id)) => Ok(id.clone()),
        Some(PeerAuth::Refused(r)) => Err(*r),
        None => Err(Reason::ClientCertRequired),
    }
}

/// A peer sidecar that hangs up on a brand-new mTLS connection before any
/// response has refused us during the handshake (with TLS 1.3 its alert can
/// lose the race with the close, leaving only a reset or broken pipe).
pub fn refine(reason: Reason, direction: Direction, fresh_upstream: bool) -> Reason {
    match (reason, direction, fresh_upstream) {
        (Reason::UpstreamReset, Direction::Outbound, true) => Reason::UpstreamTlsFailed,
        (r, _, _) => r,
    }
}

/// The handshake-failure reason counted when a request fails connecting to a peer.
fn outbound_handshake_reason(reason: Reason) -> Option<&'static str> {
    match reason {
        Reason::TlsIdentityMismatch => Some("identity-mismatch"),
        Reason::UpstreamTlsFailed => Some("tls-failed"),
        _ => None,
    }
}

/// The capability an inbound request is for. When the config names the one
/// capability this app serves, that is authoritative: a peer claiming
/// another (to reach a capability shared across tenants, say) does not
/// change it. Otherwise the caller's sidecar's claim is used.
pub fn inbound_capability(configured: Option<&str>, claimed: Option<&str>) -> Option<String> {
    configured.or(claimed).map(str::to_string)
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

/// The authority a request names: an absolute-form target's authority
/// (RFC 9112 §3.2.2: it wins over `Host`), the h2 `:authority`, or `Host`.
pub fn request_authority(req: &RequestHeader) -> Option<String> {
    if let Some((_, authority, _)) = split_absolute(req.raw_path()) {
        return Some(authority.to_string());
    }
    req.uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// The host part of an authority (`backend:8080` → `backend`, `[::1]:80` → `[::1]`).
fn host_only(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i + 1..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// Splits `http://authority/path?q` into (scheme, authority, path-and-query).
fn split_absolute(target: &[u8]) -> Option<(&str, &str, &str)> {
    let t = std::str::from_utf8(target).ok()?;
    let (scheme, rest) = t.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, pq) = rest.split_at(split);
    Some((scheme, authority, pq))
}

/// An absolute-form target (`GET http://svc/path`, from an `HTTP_PROXY`
/// client) becomes origin-form with the authority in `Host`.
fn to_origin_form(req: &mut RequestHeader) -> Result<()> {
    let Some((_, authority, pq)) = split_absolute(req.raw_path()) else {
        return Ok(());
    };
    let (authority, pq) = (authority.to_string(), pq.to_string());
    let origin = if pq.starts_with('/') {
        pq
    } else {
        format!("/{pq}")
    };
    req.set_raw_path(origin.as_bytes())?;
    req.insert_header(http::header::HOST, authority)?;
    Ok(())
}

/// Who answered, for the access log: the upstream, the idempotency store,
/// or the mechanism named by the proxy's own reason.
fn answered_by(ctx: &Ctx) -> &'static str {
    match (ctx.res.answered_by, ctx.reason) {
        (Some(a), _) => a,
        (None, Some(r)) => r.as_str(),
        (None, None) if ctx.upstream.is_some() => "upstream",
        (None, None) => "none",
    }
}

/// Which sidecar made the response, for the access log and span: this one
/// (`outbound` or `inbound`), the peer's (`peer`), or none (the app).
fn error_origin(ctx: &Ctx, dir: Direction) -> Option<&'static str> {
    match (ctx.reason, &ctx.peer_error) {
        (Some(_), _) => Some(dir.as_str()),
        (None, Some(_)) => Some("peer"),
        (None, None) => None,
    }
}

/// A request refused at the edge, before routing: a header list larger
/// than the peer sidecar's HTTP/2 server takes (431), or an HTTP/1.1
/// request without `Host` (400, RFC 9112 §3.2).
pub fn edge_refusal(req: &RequestHeader, max_header_bytes: usize) -> Option<(Reason, String)> {
    let size = framing::header_list_size(req);
    if size > max_header_bytes {
        return Some((
            Reason::RequestHeaderTooLarge,
            format!("{size} bytes of headers; the limit is {max_header_bytes}"),
        ));
    }
    if req.version == http::Version::HTTP_11
        && !req.headers.contains_key(http::header::HOST)
        && split_absolute(req.raw_path()).is_none()
    {
        return Some((
            Reason::BadRequest,
            "an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2)".to_string(),
        ));
    }
    None
}

fn upstream_detail(ctx: &Ctx) -> String {
    match (&ctx.route, ctx.upstream) {
        (Some(r), Some(a)) => format!("route {}, endpoint {a}", r.name),
        (None, Some(a)) => format!("upstream {a}"),
        _ => String::new(),
    }
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
    fn reset_on_a_fresh_peer_connection_is_a_tls_refusal() {
        use Direction::*;
        assert_eq!(
            refine(Reason::UpstreamReset, Outbound, true),
            Reason::UpstreamTlsFailed
        );
        assert_eq!(
            refine(Reason::UpstreamReset, Outbound, false),
            Reason::UpstreamReset
        );
        assert_eq!(
            refine(Reason::UpstreamReset, Inbound, true),
            Reason::UpstreamReset
        );
        assert_eq!(
            refine(Reason::UpstreamTimeout, Outbound, true),
            Reason::UpstreamTimeout
        );
    }

    #[test]
    fn edge_refusals() {
        let mut ok = req("/x", None);
        ok.insert_header("host", "backend").unwrap();
        assert_eq!(edge_refusal(&ok, 60 * 1024), None);
        // HTTP/1.0 needs no Host; absolute form carries the authority.
        let mut old = req("/x", None);
        old.set_version(http::Version::HTTP_10);
        assert_eq!(edge_refusal(&old, 60 * 1024), None);
        assert_eq!(
            edge_refusal(&req("http://backend/x", None), 60 * 1024),
            None
        );
        let (reason, detail) = edge_refusal(&req("/x", None), 60 * 1024).unwrap();
        assert_eq!(reason, Reason::BadRequest);
        assert!(detail.contains("Host"), "{detail}");
        let mut big = ok.clone();
        big.insert_header("x-big", "a".repeat(70 * 1024)).unwrap();
        let (reason, detail) = edge_refusal(&big, 60 * 1024).unwrap();
        assert_eq!(reason, Reason::RequestHeaderTooLarge);
        assert_eq!(reason.status(), 431);
        assert!(detail.contains("61440"), "{detail}");
    }

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

    #[test]
    fn h2c_choice() {
        let grpc = req("/svc/M", Some("application/grpc+proto"));
        let plain = req("/", Some("application/json"));
        assert!(wants_h2c(AppProtocol::Auto, &grpc));
        assert!(!wants_h2c(AppProtocol::Auto, &plain));
        assert!(wants_h2c(AppProtocol::H2c, &plain));
        assert!(!wants_h2c(AppProtocol::Http1, &grpc));
    }

    #[test]
    fn authority_precedence() {
        let mut abs = req("http://Backend:80/x", None);
        abs.insert_header("host", "other").unwrap();
        assert_eq!(request_authority(&abs).as_deref(), Some("Backend:80"));
        let mut origin = req("/x", None);
        origin.insert_header("host", "backend").unwrap();
        assert_eq!(request_authority(&origin).as_deref(), Some("backend"));
        assert_eq!(request_authority(&req("/x", None)), None);
        let q = req("http://svc?x=1", None);
        assert_eq!(split_absolute(q.raw_path()), Some(("http", "svc", "?x=1")));
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let mut r = req("http://backend:8080/a/b?x=1", None);
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/a/b?x=1");
        assert_eq!(r.headers["host"], "backend:8080");
        let mut o = req("/keep?y", None);
        to_origin_form(&mut o).unwrap();
        assert_eq!(o.raw_path(), b"/keep?y");
        assert!(o.headers.get("host").is_none());
    }
}
