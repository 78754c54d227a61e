//! This hop's span (or upstream attempt's): OpenTelemetry HTTP semantic
//! conventions plus `crank.*` attributes, built only when the span is
//! sampled. The trace context and export are in [`crate::tracing`].

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue as Kv;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::routing::authority::{host_only, request_authority, split_absolute};
use crate::tracing::SpanEnd;

impl MeshProxy {
    /// Starts this hop's trace context (tracing on) or keeps the caller's
    /// trace id for the logs (tracing off).
    pub(crate) fn begin_trace(&self, session: &Session, ctx: &mut Ctx) {
        let headers = &session.req_header().headers;
        match &self.rt.tracer {
            Some(t) => ctx.hop = Some(t.begin(headers)),
            None => ctx.incoming_trace_id = crate::tracing::incoming_trace_id(headers),
        }
    }

    /// Outbound, each upstream attempt is its own client span: a retry
    /// ends the previous attempt's span.
    pub(crate) fn next_attempt_span(&self, session: &Session, ctx: &mut Ctx) {
        let Some(t) = &self.rt.tracer else { return };
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

    /// Ends and queues this hop's span when it is sampled.
    pub(crate) fn finish_span(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        failure: Option<&str>,
    ) {
        if let (Some(t), Some(hop)) = (&self.rt.tracer, &ctx.hop) {
            if t.records(hop) {
                t.finish(hop, self.span_end(session, ctx, status, failure));
            }
        }
    }

    /// The span's end. `failure` is a transport error type, or why an
    /// attempt ended early.
    fn span_end(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        failure: Option<&str>,
    ) -> SpanEnd {
        let req = session.req_header();
        let mut a: Vec<Kv> = Vec::with_capacity(24);
        let name = crate::tracing::method_attrs(req.method.as_str(), &mut a);
        let kind = match self.direction {
            Direction::Inbound => SpanKind::Server,
            Direction::Outbound => SpanKind::Client,
        };
        a.push(Kv::new("network.protocol.name", "http"));
        match self.direction {
            Direction::Inbound => server_attrs(session, req, &mut a),
            Direction::Outbound => client_attrs(req, ctx, &mut a),
        }
        if status > 0 {
            a.push(Kv::new("http.response.status_code", i64::from(status)));
        }
        self.crank_attrs(req, ctx, status, &mut a);
        let error = error_type(ctx, &kind, status, failure);
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

    /// `crank.*`: direction, route, capability, peer, tenant, the policy
    /// decision, who answered and which sidecar made an error response.
    fn crank_attrs(&self, req: &RequestHeader, ctx: &Ctx, status: u16, a: &mut Vec<Kv>) {
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
                ctx.endpoint_identity.as_deref().map(str::to_string),
                Some(self.rt.me.tenant.clone()),
            ),
        };
        if let Some(c) = capability {
            a.push(Kv::new("crank.capability", c));
        }
        if let Some(d) = ctx.route.as_ref().and_then(|r| r.egress.as_ref()) {
            a.push(Kv::new(
                "crank.egress.destination",
                crate::egress::destination_label(d).to_string(),
            ));
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
        if let Some(origin) = ctx.error_origin(self.direction) {
            a.push(Kv::new("crank.error.origin", origin));
        }
    }
}

/// The request's path without the query (`/` when empty).
fn span_path(req: &RequestHeader) -> String {
    let path = match split_absolute(req.raw_path()) {
        Some((_, _, pq)) => pq.split('?').next().unwrap_or("").to_string(),
        None => req.uri.path().to_string(),
    };
    if path.is_empty() {
        "/".to_string()
    } else {
        path
    }
}

/// Inbound (server span): the app's request as it arrived.
fn server_attrs(session: &Session, req: &RequestHeader, a: &mut Vec<Kv>) {
    // The client span's wire is the sidecar-to-sidecar connection, not the
    // app's request; the version is left out there.
    a.push(Kv::new(
        "network.protocol.version",
        match req.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        },
    ));
    let downstream = session.as_downstream();
    a.push(Kv::new("url.scheme", "https"));
    a.push(Kv::new("url.path", span_path(req)));
    if let Some(host) = &request_authority(req) {
        a.push(Kv::new("server.address", host_only(host).to_string()));
    }
    if let Some(local) = downstream.server_addr().and_then(|a| a.as_inet()) {
        a.push(Kv::new("server.port", i64::from(local.port())));
    }
    if let Some(c) = downstream.client_addr().and_then(|a| a.as_inet()) {
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

/// Outbound (client span): server.* is the host the app asked for;
/// network.peer.* the peer sidecar actually reached.
fn client_attrs(req: &RequestHeader, ctx: &Ctx, a: &mut Vec<Kv>) {
    let authority = request_authority(req);
    a.push(Kv::new(
        "url.full",
        format!("http://{}{}", authority.unwrap_or(""), span_path(req)),
    ));
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

/// Semantic conventions: a server span fails on 5xx, a client span on 4xx
/// too; a request that got no response fails either way.
fn error_type(ctx: &Ctx, kind: &SpanKind, status: u16, failure: Option<&str>) -> Option<String> {
    let error_floor = match kind {
        SpanKind::Server => 500,
        _ => 400,
    };
    match (ctx.reason, failure) {
        (_, Some(f)) if status == 0 => Some(f.to_string()),
        (Some(r), _) if r.status() >= error_floor || status == 0 => Some(r.as_str().to_string()),
        (None, _) if status >= error_floor => Some(status.to_string()),
        (None, None) if status == 0 => Some("no-response".to_string()),
        _ => None,
    }
}
