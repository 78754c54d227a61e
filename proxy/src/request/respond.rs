//! The one place that writes the proxy's own responses. Every stage
//! returns a [`Refusal`]; this writes it: the status and `x-crank-error`
//! from the rescue table ([`crate::errors`]), `x-crank-error-origin`,
//! `x-crank-error-sidecar`, `x-crank-trace-id`, the stage's extra headers
//! and the one JSON error body (`{"error", "message", ...}`, see
//! [`Refusal::body`]). It also counts the
//! refusal and keeps it for the next traffic report.

use bytes::Bytes;
use pingora_error::Error;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::errors::{classify, Reason, Refusal};
use crate::headers::{ERROR_HEADER, ERROR_ORIGIN_HEADER, ERROR_SIDECAR_HEADER, TRACE_ID_HEADER};

impl MeshProxy {
    /// Refuses a request before it reaches any upstream: logged, and the
    /// connection closed after it when the request may carry more bytes
    /// that were never read as a request.
    pub(crate) async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, r: Refusal) {
        if logged_here(r.reason) {
            tracing::warn!(
                direction = self.direction.as_str(),
                reason = r.reason.as_str(),
                detail = r.detail.as_str(),
                "refused request"
            );
        }
        if closes_connection(r.reason) {
            session.set_keepalive(None);
        }
        self.respond(session, ctx, r).await;
    }

    /// The refusal for a request that failed after the phases let it go
    /// upstream (connect, TLS, timeouts, resets, the route's deadline).
    pub(crate) fn failure(&self, e: &Error, ctx: &Ctx) -> Refusal {
        let reason = self.resilience_reason(e, ctx).unwrap_or_else(|| {
            crate::errors::refine(classify(e), self.direction, ctx.fresh_upstream)
        });
        let mut detail = ctx.upstream_detail();
        if reason == Reason::TlsIdentityMismatch {
            // Name both identities: what the route expects and what the
            // peer's certificate presented.
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
        let r = Refusal::new(reason, detail);
        match self.retry_after_for(reason, ctx) {
            Some(secs) => r.header("retry-after", secs.to_string()),
            None => r,
        }
    }

    /// Writes a refusal.
    pub(crate) async fn respond(&self, session: &mut Session, ctx: &mut Ctx, r: Refusal) {
        let reason = r.reason;
        ctx.reason = Some(reason);
        self.rt
            .metrics
            .proxy_errors
            .with_label_values(&[self.direction.as_str(), reason.as_str()])
            .inc();
        let status = r.status();
        self.note_refusal(session, ctx, reason, status);
        let trace_id = ctx.trace_id();
        let body = r.body(trace_id.as_deref());
        let Ok(mut resp) = ResponseHeader::build(status, Some(6 + r.headers.len())) else {
            return;
        };
        let _ = resp.insert_header(ERROR_HEADER, reason.as_str());
        let _ = resp.insert_header(ERROR_ORIGIN_HEADER, self.direction.as_str());
        let _ = resp.insert_header(ERROR_SIDECAR_HEADER, self.rt.me.spiffe_id.as_str());
        if let Some(id) = trace_id {
            let _ = resp.insert_header(TRACE_ID_HEADER, &*id);
        }
        for (k, v) in r.headers {
            let _ = resp.insert_header(k, v);
        }
        let _ = resp.insert_header(http::header::CONTENT_TYPE, crate::errors::BODY_TYPE);
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

    /// Keeps a policy denial or a shed request for the next traffic report
    /// to crank-control (only with `mesh`; never waits).
    fn note_refusal(&self, session: &Session, ctx: &Ctx, reason: Reason, status: u16) {
        let Some(refusals) = &self.rt.refusals else {
            return;
        };
        if !crate::mesh::report::is_reported(reason) {
            return;
        }
        let req = session.req_header();
        // Nothing is formatted unless the ring is free to take it.
        refusals.push_with(|| {
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
            crate::mesh::report::event(
                self.direction.as_str(),
                status,
                reason,
                ctx.route_label(self.direction),
                req.method.as_str(),
                req.uri.path(),
                source,
            )
        });
    }
}

/// Refusals logged when they are written (the policy stage logs its own;
/// resilience refusals are counted, not logged, as they come in floods).
fn logged_here(reason: Reason) -> bool {
    closes_connection(reason)
        || matches!(
            reason,
            Reason::NoRoute
                | Reason::EgressNotDeclared
                | Reason::OwnCertRevoked
                | Reason::OwnCertExpired
        )
}

/// Refusals after which the connection is closed: the request's framing
/// or sender cannot be trusted with a next request.
fn closes_connection(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::BadFraming
            | Reason::BadRequest
            | Reason::RequestHeaderTooLarge
            | Reason::ClientCertRequired
            | Reason::PeerIdentityInvalid
            | Reason::PeerCertRevoked
    )
}
