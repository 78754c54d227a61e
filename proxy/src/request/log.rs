//! The end of a request: `crankctl tap`'s event, the request metrics and
//! the JSON access log line.

use std::time::Duration;

use pingora_error::Error;
use pingora_proxy::Session;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::logging::{AddrText, JsonLine};
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
        let route = ctx.route_label(self.direction);
        let secs = elapsed.as_secs_f64();
        super::series::observe(&self.rt, self.direction, route, status, secs);
        let m = &self.rt.metrics;
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
        let enabled = tracing::enabled!(target: "crank::access", tracing::Level::INFO);
        // The fields, their order and their JSON are those tracing's
        // formatter wrote (docs/reference/proxy-config.md, the access log).
        JsonLine::emit("crank::access", enabled, |l| {
            l.str("direction", Some(self.direction.as_str()));
            l.str("route", Some(ctx.route_label(self.direction)));
            l.str("method", Some(req.method.as_str()));
            l.str("path", Some(req.uri.path()));
            l.u64("status", u64::from(status));
            l.f64("duration_ms", elapsed.as_secs_f64() * 1000.0);
            l.display("protocol", Some(&Protocol(req.version)));
            let upstream = ctx.upstream.as_ref().map(AddrText);
            l.display("upstream", upstream.as_ref().map(|u| u as _));
            l.str("peer", ctx.peer.as_ref().map(|p| p.spiffe_id.as_str()));
            l.str("crank_error", ctx.reason.map(|r| r.as_str()));
            l.str("answered_by", Some(ctx.answered_by()));
            l.str("error_origin", ctx.error_origin(self.direction));
            l.u64("retries", u64::from(ctx.res.retries));
            l.str("policy", ctx.policy.as_ref().map(|p| p.1));
            l.str("decision_id", ctx.policy.as_ref().map(|p| p.0.as_str()));
            l.display("error", e.map(|e| e as _));
            l.str("trace_id", ctx.trace_id().as_deref());
            l.str(
                "span_id",
                span_id.as_ref().and_then(|b| std::str::from_utf8(b).ok()),
            );
        });
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
                ctx.endpoint_identity.as_deref().map(str::to_string),
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

/// The HTTP version as tracing's `?` field wrote it (its `Debug`).
struct Protocol(http::Version);

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_11 => "HTTP/1.1",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            other => return write!(f, "{other:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn protocol_as_debug_writes_it() {
        use http::Version as V;
        for v in [V::HTTP_09, V::HTTP_10, V::HTTP_11, V::HTTP_2, V::HTTP_3] {
            assert_eq!(Protocol(v).to_string(), format!("{v:?}"));
        }
    }
}
