//! `attempt` (outbound): the upstream attempts of a request. Before each:
//! back off if it is a retry, check the route's deadline, pick an endpoint
//! (power of two choices, skipping ejected and, for a retry, tried ones).
//! After each: record its outcome for outlier detection and the balancer,
//! and decide a retry under the route's policy and budget.

use std::sync::Arc;
use std::time::Duration;

use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::time::Instant;

use super::{CIRCUIT_OPEN, DEADLINE, NO_ENDPOINTS, RETRY_STATUS};
use crate::direction::Direction;
use crate::errors::Reason;
use crate::headers::ERROR_HEADER;
use crate::request::{Ctx, MeshProxy};
use crate::resilience::breaker::CircuitState;
use crate::resilience::retry::{self, Failure, PeerRefusal};
use crate::resilience::retry_after_secs;
use crate::routing::Route;

impl MeshProxy {
    /// Before an outbound attempt: back off if it is a retry, check the
    /// deadline, and pick an endpoint that can take it.
    pub(crate) async fn next_endpoint(
        &self,
        ctx: &mut Ctx,
        route: &Arc<Route>,
    ) -> pingora_error::Result<usize> {
        if ctx.res.retries > 0 && ctx.attempts > 1 {
            let wait = retry::backoff(&route.cfg.retry, ctx.res.retries, rand::random());
            let wait = match ctx.res.deadline {
                Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
                None => wait,
            };
            tokio::time::sleep(wait).await;
        }
        if self.deadline_passed(ctx) {
            return Err(Error::explain(DEADLINE, "the route's deadline passed"));
        }
        // A request with an Idempotency-Key goes first to the endpoint its
        // key maps to, so a resent duplicate reaches the replica that kept
        // the first response (when that endpoint can take it).
        let affinity: Vec<usize>;
        let exclude: &[usize] = match ctx.res.affinity {
            Some(h) if ctx.res.tried.is_empty() && route.endpoints.len() > 1 => {
                let home = (h % route.endpoints.len() as u64) as usize;
                affinity = (0..route.endpoints.len()).filter(|i| *i != home).collect();
                &affinity
            }
            _ => &ctx.res.tried,
        };
        if route.endpoints.is_empty() {
            return Err(Error::explain(
                NO_ENDPOINTS,
                format!("route {} has no endpoints", route.name),
            ));
        }
        let Some((pick, _)) = route.pick(exclude) else {
            return Err(Error::explain(
                CIRCUIT_OPEN,
                format!("every endpoint of route {} is ejected", route.name),
            ));
        };
        if pick.probe {
            let addr = route.endpoints[pick.index].address.to_string();
            self.rt
                .metrics
                .resilience
                .circuit_state
                .with_label_values(&[route.name.as_str(), &addr])
                .set(CircuitState::HalfOpen.gauge());
            tracing::info!(route = %route.name, endpoint = %addr, "sending a probe request to an ejected endpoint");
        }
        if ctx.res.connect_retry && ctx.res.tried.contains(&pick.index) {
            // The untried endpoints are ejected: the retry of a connect
            // failure would only hit the endpoint that just refused.
            return Err(Error::explain(
                ErrorType::ConnectError,
                "no other endpoint of the route can take the retry",
            ));
        }
        ctx.res.tried.push(pick.index);
        ctx.res.pick = Some(pick);
        ctx.res.in_flight = Some(route.state.breakers.start(pick.index));
        Ok(pick.index)
    }

    /// The connection to the endpoint is ready: the attempt's latency for
    /// the balancer runs from here (connect and handshake do not count).
    pub(crate) fn attempt_sent(&self, ctx: &mut Ctx) {
        if let Some(f) = ctx.res.in_flight.as_mut() {
            f.sent();
        }
    }

    /// The read timeout of an attempt: the configured one, cut to what is
    /// left of the route's deadline.
    pub(crate) fn attempt_timeout(&self, ctx: &Ctx, configured: Duration) -> Duration {
        match ctx.res.deadline {
            Some(d) => configured.min(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
            None => configured,
        }
    }

    fn deadline_passed(&self, ctx: &Ctx) -> bool {
        ctx.res.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Records the outcome of the attempt in progress: `healthy` for
    /// outlier detection (not a 5xx, connect failure or reset), `served`
    /// for the balancer (its latency counts; otherwise the endpoint's
    /// estimate is doubled).
    pub(crate) fn record_attempt(&self, ctx: &mut Ctx, healthy: bool, served: bool) {
        let in_flight = ctx.res.in_flight.take();
        let (Some(route), Some(pick)) = (ctx.route.as_ref(), ctx.res.pick.take()) else {
            return;
        };
        let t = route.state.breakers.record(pick, healthy);
        // After the breaker: a probe that closed the circuit has reset the
        // estimate, and its own latency is the first sample.
        if let Some(f) = in_flight {
            f.finish(served);
        }
        let Some(t) = t else {
            return;
        };
        let addr = route.endpoints[t.index].address.to_string();
        let r = &self.rt.metrics.resilience;
        r.circuit_state
            .with_label_values(&[route.name.as_str(), &addr])
            .set(t.to.gauge());
        if t.to == CircuitState::Open {
            r.ejections
                .with_label_values(&[route.name.as_str(), &addr])
                .inc();
            tracing::warn!(route = %route.name, endpoint = %addr, ejection = ?t.ejection, from = t.from.as_str(), "endpoint ejected after consecutive failures");
        } else {
            tracing::info!(route = %route.name, endpoint = %addr, from = t.from.as_str(), to = t.to.as_str(), "endpoint circuit changed");
        }
    }

    /// Ends the attempt in progress without a verdict on the endpoint: the
    /// failure was about this request (see [`Endpoints::release`]).
    ///
    /// [`Endpoints::release`]: crate::resilience::breaker::Endpoints::release
    pub(crate) fn release_attempt(&self, ctx: &mut Ctx) {
        ctx.res.in_flight.take();
        if let (Some(route), Some(pick)) = (ctx.route.as_ref(), ctx.res.pick.take()) {
            route.state.breakers.release(pick);
        }
    }

    /// Whether to retry the outbound attempt that failed with `failure`:
    /// the route's policy covers it, attempts and the deadline are left,
    /// the request can be resent, and the budget has a retry.
    pub(crate) fn may_retry(&self, session: &Session, ctx: &mut Ctx, failure: Failure) -> bool {
        let Some(route) = ctx.route.clone() else {
            return false;
        };
        let cfg = &route.cfg.retry;
        let safe = route.cfg.idempotent || session.req_header().method.is_idempotent();
        // A connect or TLS failure is only worth retrying elsewhere.
        let untried_left = ctx.res.tried.len() < route.endpoints.len();
        if ctx.res.retries >= cfg.attempts
            || !retry::covers(cfg, safe, failure)
            || (failure == Failure::Connect && !untried_left)
            || session.response_written().is_some()
            || session.as_ref().retry_buffer_truncated()
            || self.deadline_passed(ctx)
        {
            return false;
        }
        let m = &self.rt.metrics.resilience;
        if !route.state.budget.withdraw() {
            m.budget_exhausted
                .with_label_values(&[route.name.as_str()])
                .inc();
            tracing::warn!(route = %route.name, failure = failure.as_str(), "retry budget spent; returning the failure to the caller");
            return false;
        }
        ctx.res.retries += 1;
        ctx.res.connect_retry = failure == Failure::Connect;
        // The span's error.type: the status (semantic conventions), or
        // the failure; callers that know the precise reason replace it.
        ctx.retried_because = Some(match failure {
            Failure::Status(s) => s.to_string().into(),
            f => f.as_str().into(),
        });
        m.retries
            .with_label_values(&[route.name.as_str(), failure.as_str()])
            .inc();
        true
    }

    /// `upstream_response_filter`, outbound: the endpoint's outcome, and a
    /// retry when the status is one the route retries. A peer sidecar that
    /// sheds load (`x-crank-error: overloaded`) is healthy and said when to
    /// come back: the request may go elsewhere, but the endpoint is not
    /// ejected for it.
    pub(crate) fn on_upstream_status(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        resp: &ResponseHeader,
    ) -> pingora_error::Result<()> {
        let status = resp.status.as_u16();
        let shed_by_peer = resp
            .headers
            .get(ERROR_HEADER)
            .is_some_and(|v| retry::is_shedding(v.as_bytes()));
        // A shedding peer is healthy, but its quick 503 must not make it
        // look fast to the balancer.
        let failed = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.cfg.circuit.failure_statuses.contains(&status));
        // A quick 500 that does not count against the endpoint must still
        // not make it look fast to the balancer.
        self.record_attempt(
            ctx,
            shed_by_peer || !failed,
            !shed_by_peer && !failed && status < 500,
        );
        if status >= 500 && self.may_retry(session, ctx, Failure::Status(status)) {
            ctx.res.status_retry = true;
            let mut e = Error::explain(RETRY_STATUS, format!("upstream answered {status}"));
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    /// `error_while_proxy`, outbound: a failed attempt before any response
    /// counts against the endpoint and may be retried. Returns whether it
    /// was decided here.
    pub(crate) fn on_attempt_error(&self, session: &Session, ctx: &mut Ctx, e: &mut Error) -> bool {
        if std::mem::take(&mut ctx.res.status_retry) {
            e.set_retry(true);
            return true;
        }
        if *e.esource() != pingora_error::ErrorSource::Upstream
            || session.response_written().is_some()
        {
            return false;
        }
        if let Some(refusal) = retry::peer_refusal(e) {
            return self.on_peer_refusal(session, ctx, e, refusal);
        }
        let timeout = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        // Only a TLS error the handshake reported counts as "nothing was
        // sent"; a reset on a new connection may come after the peer passed
        // the request on, so it stays a reset (idempotent requests only).
        let reason = crate::errors::classify(e);
        let failure = if timeout && self.deadline_passed(ctx) {
            Failure::Timeout
        } else if matches!(
            reason,
            Reason::UpstreamTlsFailed | Reason::TlsIdentityMismatch | Reason::UpstreamCertRevoked
        ) {
            // Refused during the handshake (TLS 1.3 reports it on the
            // first read): the app never saw the request.
            Failure::Connect
        } else {
            Failure::Reset
        };
        // A reset on a brand-new connection is most likely the peer
        // refusing our certificate: retry it (idempotent requests only, as
        // a reset) but never on the same endpoint.
        let refined = crate::errors::refine(reason, Direction::Outbound, ctx.fresh_upstream);
        let elsewhere_only = failure == Failure::Connect || refined == Reason::UpstreamTlsFailed;
        self.record_attempt(ctx, false, false);
        let untried_left = ctx
            .route
            .as_ref()
            .is_some_and(|r| ctx.res.tried.len() < r.endpoints.len());
        let retry = (!elsewhere_only || untried_left) && self.may_retry(session, ctx, failure);
        if retry {
            ctx.res.connect_retry |= elsewhere_only;
            ctx.retried_because = Some(refined.as_str().into());
        }
        e.set_retry(retry);
        retry
    }

    /// The reason for a failed request when resilience made it fail.
    pub(crate) fn resilience_reason(&self, e: &Error, ctx: &Ctx) -> Option<Reason> {
        if ctx.res.peer_refused {
            return Some(Reason::PeerRefusedRequest);
        }
        match e.etype() {
            t if *t == CIRCUIT_OPEN => Some(Reason::CircuitOpen),
            t if *t == NO_ENDPOINTS => Some(Reason::NoEndpoints),
            t if *t == DEADLINE => Some(Reason::RequestTimeout),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
                if self.deadline_passed(ctx) =>
            {
                Some(Reason::RequestTimeout)
            }
            _ => None,
        }
    }

    /// `Retry-After` for a failure the proxy answers itself, in seconds.
    pub(crate) fn retry_after_for(&self, reason: Reason, ctx: &Ctx) -> Option<u64> {
        match reason {
            Reason::CircuitOpen => ctx
                .route
                .as_ref()
                .map(|r| retry_after_secs(r.cfg.circuit.base_ejection)),
            Reason::NoEndpoints => Some(5),
            _ => None,
        }
    }

    /// Counts a 504 request-timeout.
    pub(crate) fn count_timeout(&self, ctx: &Ctx) {
        self.rt
            .metrics
            .resilience
            .timeouts
            .with_label_values(&[ctx.route_label(self.direction)])
            .inc();
    }

    /// Outbound response body: the deadline also holds while the body streams.
    pub(crate) fn check_deadline_mid_body(
        &self,
        ctx: &Ctx,
        end: bool,
    ) -> pingora_error::Result<()> {
        if !end && self.deadline_passed(ctx) {
            return Err(Error::explain(
                DEADLINE,
                "the route's deadline passed while the response body was streaming",
            ));
        }
        Ok(())
    }

    /// The peer sidecar reset the stream: about this request, not the
    /// endpoint. A malformed request is not retried; a refused stream
    /// (nothing processed, RFC 9113 §8.7) may go elsewhere, any method.
    fn on_peer_refusal(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        e: &mut Error,
        refusal: PeerRefusal,
    ) -> bool {
        // One caller's bad requests must not eject a healthy endpoint for
        // everyone, and a busy peer is not an unhealthy one.
        self.release_attempt(ctx);
        match refusal {
            PeerRefusal::Malformed => {
                // Resending it elsewhere would only be refused again.
                ctx.res.peer_refused = true;
                tracing::info!(upstream = ?ctx.upstream, error = %e, "the peer sidecar refused the request as malformed; not retried, not counted against the endpoint");
                e.set_retry(false);
            }
            PeerRefusal::Refused => {
                let retry = self.may_retry(session, ctx, Failure::Connect);
                if retry {
                    ctx.res.connect_retry = true;
                    ctx.retried_because = Some("refused-stream".into());
                }
                e.set_retry(retry);
            }
        }
        true
    }
}
