//! The end of a request: `crankctl tap`'s event, the request metrics and
//! the JSON access log line.

use std::time::Duration;

use pingora_error::Error;
use pingora_proxy::Session;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::metrics::status_class;
use crate::routing::authority::split_absolute;

impl MeshProxy {
    /// Publishes the request to taps, counts it and writes its access log line.
    pub(crate) fn log_request(&self, session: &Session, ctx: &Ctx, status: u16, e: Option<&Error>) {
        let elapsed = ctx.start.elapsed();
        if self.rt.tap.active() {
            self.rt
                .tap
                .publish(self.tap_event(session, ctx, status, elapsed));
        }
        let dir = self.direction.as_str();
        let route = ctx.route_label(self.direction);
        let m = &self.rt.metrics;
        m.requests
            .with_label_values(&[dir, route, status_class(status)])
            .inc();
        m.latency
            .with_label_values(&[dir, route])
            .observe(elapsed.as_secs_f64());
        if let Some(d) = ctx.route.as_ref().and_then(|r| r.egress.as_ref()) {
            let dest = crate::egress::destination_label(d);
            m.egress
                .requests
                .with_label_values(&[route, dest, status_class(status)])
                .inc();
        }
        if self.rt.access_log {
            self.access_log(session, ctx, status, elapsed, e);
        }
    }

    fn access_log(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        elapsed: Duration,
        e: Option<&Error>,
    ) {
        let req = session.req_header();
        let span_id = ctx.hop.as_ref().map(|h| super::ctx::hex::<16>(&h.span_id));
        tracing::info!(
            target: "crank::access",
            direction = self.direction.as_str(),
            route = %ctx.route_label(self.direction),
            method = %req.method,
            path = req.uri.path(),
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            protocol = ?req.version,
            upstream = ctx.upstream.as_ref().map(tracing::field::display),
            peer = ctx.peer.as_ref().map(|p| p.spiffe_id.as_str()),
            crank_error = ctx.reason.map(|r| r.as_str()),
            answered_by = ctx.answered_by(),
            error_origin = ctx.error_origin(self.direction),
            retries = ctx.res.retries,
            policy = ctx.policy.as_ref().map(|p| p.1),
            decision_id = ctx.policy.as_ref().map(|p| p.0.as_str()),
            error = e.map(|e| e.to_string()),
            trace_id = ctx.trace_id().as_deref(),
            span_id = span_id.as_ref().and_then(|b| std::str::from_utf8(b).ok()),
        );
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
            trace_id: ctx.trace_id().map(|t| t.to_string()),
            crank_error: ctx.crank_error(),
        }
    }
}
