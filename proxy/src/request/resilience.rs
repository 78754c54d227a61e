//! The resilience steps of a request, in phase order. The proxy phases in
//! `proxy.rs` call these; each step asks the state machine of its module
//! and answers the request itself when that says so.
//!
//! `request_filter`, after policy: quota → fault (outbound) → idempotency
//! (inbound) → concurrency slot. `upstream_peer` (outbound): backoff on a
//! retry → deadline → endpoint pick (balancer). Response and error phases:
//! outlier detection and the balancer's latency estimate record the
//! attempt, and [`MeshProxy::may_retry`] decides a retry under the route's
//! budget.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use crank_api::proxy::InFlightMode;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::time::Instant;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::errors::Reason;
use crate::resilience::breaker::{CircuitState, InFlight, Pick};
use crate::resilience::idempotency::{self, Begin, Claim, Completed, RequestHasher};
use crate::resilience::ratelimit::{Quotas, RateDecision};
use crate::resilience::retry::{self, Failure, PeerRefusal};
use crate::resilience::shed::{Permit, Shed};
use crate::resilience::{fault, retry_after_secs};
use crate::routing::Route;

/// The header naming the key of an idempotent request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response replayed from the idempotency store.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Custom error types the resilience steps raise from `upstream_peer`.
const CIRCUIT_OPEN: ErrorType = ErrorType::Custom("circuit-open");
const NO_ENDPOINTS: ErrorType = ErrorType::Custom("no-endpoints");
const DEADLINE: ErrorType = ErrorType::Custom("request-timeout");
const RETRY_STATUS: ErrorType = ErrorType::Custom("retry-on-status");

/// Per-request resilience state, part of the proxy's `Ctx`.
#[derive(Default)]
pub struct ResCtx {
    /// The concurrency slot; freed when the request ends.
    permit: Option<Permit>,
    /// The endpoint of the attempt in progress, until its outcome is known.
    pick: Option<Pick>,
    /// The attempt in progress, counted in its endpoint's load until its
    /// outcome is known (or the request ends).
    in_flight: Option<InFlight>,
    /// Endpoints this request tried (a retry avoids them).
    tried: Vec<usize>,
    /// The route's request deadline.
    deadline: Option<Instant>,
    pub retries: u32,
    /// Outbound: the hash of the request's `Idempotency-Key`, which picks
    /// its first endpoint.
    affinity: Option<u64>,
    /// The response status that made `upstream_response_filter` ask for a retry.
    status_retry: bool,
    /// The retry in progress follows a connect or TLS failure: it must go
    /// to an endpoint not tried yet.
    connect_retry: bool,
    /// The quota decision, for `RateLimit` headers on the response.
    rate: Option<RateDecision>,
    idem: Option<IdemCtx>,
    /// Set for a status that is not the reason's (fault aborts).
    pub status_override: Option<u16>,
    /// Who answered when it was neither the upstream nor an error reason.
    pub answered_by: Option<&'static str>,
    /// The peer sidecar refused the request as malformed: answered as
    /// `peer-refused-request`.
    peer_refused: bool,
}

/// The first request with an `Idempotency-Key`: its claim, request hash and
/// the response being captured.
struct IdemCtx {
    claim: Claim,
    hasher: Option<RequestHasher>,
    hash: Option<[u8; 32]>,
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: BytesMut,
    too_large: bool,
}

impl MeshProxy {
    /// The resilience checks before a request goes upstream. Returns false
    /// when the request was answered here.
    pub(crate) async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> bool {
        if !self.check_quota(session, ctx).await {
            return false;
        }
        match (self.direction, ctx.route.clone()) {
            (Direction::Outbound, Some(route)) => {
                if let Some(f) = &route.cfg.fault {
                    if !self.inject_faults(session, ctx, &route, f).await {
                        return false;
                    }
                }
                route.state.budget.deposit();
                ctx.res.affinity = idempotency_affinity(session.req_header());
                ctx.res.deadline = route.cfg.timeout.map(|t| Instant::now() + t);
            }
            _ => {
                if !self.check_idempotency(session, ctx).await {
                    return false;
                }
            }
        }
        self.take_slot(session, ctx).await
    }

    async fn check_quota(&self, session: &mut Session, ctx: &mut Ctx) -> bool {
        let quotas = self.rt.quotas.load();
        let mut from_header = false;
        let (q, tenant, capability): (&Quotas, Cow<str>, Cow<str>) = match self.direction {
            Direction::Inbound => {
                if quotas.inbound.is_empty() {
                    return true;
                }
                let tenant = ctx.peer.as_ref().map_or("", |p| p.tenant.as_str());
                let cap = self.inbound_capability(session.req_header());
                (
                    &quotas.inbound,
                    Cow::Borrowed(tenant),
                    Cow::Owned(cap.unwrap_or_default()),
                )
            }
            Direction::Outbound => {
                if quotas.outbound.is_empty() {
                    return true;
                }
                let header = quotas.tenant_header.as_ref().and_then(|h| {
                    session
                        .req_header()
                        .headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                });
                from_header = header.is_some();
                let tenant = header.unwrap_or(self.rt.me.tenant.as_str());
                let cap = ctx
                    .route
                    .as_ref()
                    .map_or("", |r| r.capability.as_deref().unwrap_or(r.name.as_str()));
                (
                    &quotas.outbound,
                    Cow::Owned(tenant.to_string()),
                    Cow::Owned(cap.to_string()),
                )
            }
        };
        let Some(d) = q.check(&tenant, &capability) else {
            return true;
        };
        if d.allowed {
            if quotas.headers.on_allowed(d.remaining, d.burst) {
                ctx.res.rate = Some(d);
            }
            return true;
        }
        // A tenant named by the caller's header (edge traffic) is not a
        // label: callers could make series without bound.
        let label = if from_header {
            "(tenant_header)"
        } else {
            &tenant
        };
        self.rt
            .metrics
            .resilience
            .ratelimited
            .with_label_values(&[self.direction.as_str(), label, &capability])
            .inc();
        let detail = format!(
            "tenant {tenant:?}, capability {capability:?}, quota {} ({} per {}s)",
            d.policy, d.quota, d.window_secs
        );
        let (ra, policy, now) = (
            d.retry_after_secs.to_string(),
            d.policy_header(),
            d.ratelimit_header(),
        );
        self.respond_extra(
            session,
            ctx,
            Reason::RateLimited,
            &detail,
            &[
                ("retry-after", &ra),
                ("ratelimit-policy", &policy),
                ("ratelimit", &now),
            ],
        )
        .await;
        false
    }

    async fn inject_faults(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: &Route,
        cfg: &crank_api::proxy::FaultConfig,
    ) -> bool {
        let f = fault::roll(cfg);
        let m = &self.rt.metrics.resilience.faults;
        if let Some(d) = f.delay {
            m.with_label_values(&[route.name.as_str(), "delay"]).inc();
            tokio::time::sleep(d).await;
        }
        let Some(status) = f.abort else {
            return true;
        };
        m.with_label_values(&[route.name.as_str(), "abort"]).inc();
        ctx.res.status_override = Some(status);
        let detail = format!("route {}, abort with {status}", route.name);
        self.respond_extra(session, ctx, Reason::FaultInjected, &detail, &[])
            .await;
        false
    }

    async fn take_slot(&self, session: &mut Session, ctx: &mut Ctx) -> bool {
        let route = ctx.route.clone();
        let limiter = match self.direction {
            Direction::Inbound => self.rt.inbound_limiter.as_ref(),
            Direction::Outbound => route.as_ref().and_then(|r| r.state.limiter.as_ref()),
        };
        let Some(l) = limiter else {
            return true;
        };
        let shed = match l.acquire().await {
            Ok(p) => {
                ctx.res.permit = Some(p);
                return true;
            }
            Err(s) => s,
        };
        let label = ctx.route_label(self.direction).to_string();
        self.rt
            .metrics
            .resilience
            .shed
            .with_label_values(&[self.direction.as_str(), &label, shed.as_str()])
            .inc();
        let reason = match shed {
            Shed::QueueFull => Reason::Overloaded,
            Shed::QueueTimeout => Reason::QueueTimeout,
        };
        let detail = format!("{label}: {} running, {} waiting", l.in_use(), l.waiting());
        let ra = retry_after_secs(l.retry_after).to_string();
        self.respond_extra(session, ctx, reason, &detail, &[("retry-after", &ra)])
            .await;
        false
    }

    /// Inbound `Idempotency-Key` on a non-idempotent request: the first
    /// runs (and its response is kept), a duplicate gets the kept
    /// response. Returns false when the request was answered here.
    async fn check_idempotency(&self, session: &mut Session, ctx: &mut Ctx) -> bool {
        let Some(store) = self.rt.idempotency.as_ref() else {
            return true;
        };
        let req = session.req_header();
        if req.method.is_idempotent() {
            return true;
        }
        let Some(raw) = req.headers.get(IDEMPOTENCY_KEY) else {
            return true;
        };
        // A structured-field string ("abc") or a bare token.
        let raw = raw.as_bytes();
        let key = raw
            .strip_prefix(b"\"")
            .and_then(|k| k.strip_suffix(b"\""))
            .unwrap_or(raw);
        if key.is_empty() || key.len() > 255 {
            self.respond(session, ctx, Reason::IdempotencyKeyInvalid, "")
                .await;
            return false;
        }
        let scope = self
            .inbound_capability(req)
            .unwrap_or_else(|| "app".to_string());
        let tenant = ctx.peer.as_ref().map_or("", |p| p.tenant.as_str());
        let scoped = format!(
            "{tenant}\u{1f}{scope}\u{1f}{}",
            String::from_utf8_lossy(key)
        );
        let hasher = RequestHasher::new(
            req.method.as_str(),
            &String::from_utf8_lossy(req.raw_path()),
        );
        let cfg = self.rt.config.load();
        let Some(icfg) = cfg.inbound.as_ref().map(|i| &i.idempotency) else {
            return true;
        };
        match idempotency::begin(store, &scoped) {
            Begin::First(claim) => {
                ctx.res.idem = Some(IdemCtx::new(claim, Some(hasher), None));
                true
            }
            Begin::Full => {
                self.count_shed(ctx, "idempotency-store-full");
                self.respond_extra(
                    session,
                    ctx,
                    Reason::IdempotencyStoreFull,
                    "",
                    &[("retry-after", "1")],
                )
                .await;
                false
            }
            Begin::Done(c) => {
                if let Some(hash) = self.hash_body(session, ctx, hasher).await {
                    self.replay(session, ctx, &c, hash).await;
                }
                false
            }
            Begin::InFlight(w) => {
                if icfg.in_flight == InFlightMode::Reject {
                    self.in_use(session, ctx).await;
                    return false;
                }
                let Some(hash) = self.hash_body(session, ctx, hasher).await else {
                    return false;
                };
                match w.wait(icfg.wait_timeout).await {
                    idempotency::WaitOutcome::Done(c) => {
                        self.replay(session, ctx, &c, hash).await;
                        false
                    }
                    // The first failed without a response: this one may
                    // run, if its body is still held to send upstream.
                    idempotency::WaitOutcome::Abandoned
                        if !session.as_ref().retry_buffer_truncated() =>
                    {
                        match idempotency::begin(store, &scoped) {
                            Begin::First(claim) => {
                                ctx.res.idem = Some(IdemCtx::new(claim, None, Some(hash)));
                                true
                            }
                            Begin::Done(c) => {
                                self.replay(session, ctx, &c, hash).await;
                                false
                            }
                            _ => {
                                self.in_use(session, ctx).await;
                                false
                            }
                        }
                    }
                    _ => {
                        self.in_use(session, ctx).await;
                        false
                    }
                }
            }
        }
    }

    pub(crate) fn count_shed(&self, ctx: &Ctx, reason: &str) {
        self.rt
            .metrics
            .resilience
            .shed
            .with_label_values(&[
                self.direction.as_str(),
                ctx.route_label(self.direction),
                reason,
            ])
            .inc();
    }

    async fn in_use(&self, session: &mut Session, ctx: &mut Ctx) {
        self.count_replay("in-use");
        self.respond_extra(
            session,
            ctx,
            Reason::IdempotencyKeyInUse,
            "",
            &[("retry-after", "1")],
        )
        .await;
    }

    fn count_replay(&self, result: &str) {
        self.rt
            .metrics
            .resilience
            .replays
            .with_label_values(&[result])
            .inc();
    }

    /// Reads a duplicate's whole body to hash it. The first 64 KiB stay in
    /// Pingora's retry buffer, so the request can still be sent upstream.
    async fn hash_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mut hasher: RequestHasher,
    ) -> Option<[u8; 32]> {
        session.as_mut().enable_retry_buffering();
        loop {
            match session.as_mut().read_request_body().await {
                Ok(Some(chunk)) => hasher.update(&chunk),
                Ok(None) => return Some(hasher.finish()),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the body of a duplicate idempotent request failed");
                    self.respond(
                        session,
                        ctx,
                        Reason::BadRequest,
                        "reading the request body failed",
                    )
                    .await;
                    return None;
                }
            }
        }
    }

    /// Answers a duplicate from the completed first request.
    async fn replay(&self, session: &mut Session, ctx: &mut Ctx, c: &Completed, hash: [u8; 32]) {
        if c.request_hash != hash {
            self.count_replay("mismatch");
            self.respond(session, ctx, Reason::IdempotencyKeyMismatch, "")
                .await;
            return;
        }
        let Some(r) = &c.response else {
            self.count_replay("unavailable");
            self.respond(session, ctx, Reason::IdempotencyReplayUnavailable, "")
                .await;
            return;
        };
        self.count_replay("replayed");
        ctx.res.answered_by = Some("idempotency-replay");
        let Ok(mut resp) = ResponseHeader::build(r.status, Some(r.headers.len() + 2)) else {
            return;
        };
        for (k, v) in &r.headers {
            if let Ok(v) = http::HeaderValue::from_bytes(v) {
                let _ = resp.append_header(k.clone(), v);
            }
        }
        let _ = resp.insert_header(REPLAYED_HEADER, "true");
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, r.body.len().to_string());
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session
                .write_response_body(Some(r.body.clone()), true)
                .await;
        }
    }

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
            .get(crate::headers::ERROR_HEADER)
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
        match retry::peer_refusal(e) {
            Some(PeerRefusal::Malformed) => {
                // About this request, not the endpoint: one caller's bad
                // requests must not eject a healthy endpoint for everyone,
                // and resending it elsewhere would only be refused again.
                self.release_attempt(ctx);
                ctx.res.peer_refused = true;
                tracing::info!(upstream = ?ctx.upstream, error = %e, "the peer sidecar refused the request as malformed; not retried, not counted against the endpoint");
                e.set_retry(false);
                return true;
            }
            Some(PeerRefusal::Refused) => {
                // REFUSED_STREAM: the peer processed nothing (RFC 9113
                // §8.7), so any method may go elsewhere; a busy peer is not
                // an unhealthy one.
                self.release_attempt(ctx);
                let retry = self.may_retry(session, ctx, Failure::Connect);
                if retry {
                    ctx.res.connect_retry = true;
                    ctx.retried_because = Some("refused-stream".into());
                }
                e.set_retry(retry);
                return true;
            }
            None => {}
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
        let refined = super::refine(reason, Direction::Outbound, ctx.fresh_upstream);
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

    /// `response_filter`: `RateLimit` headers, and the start of the
    /// response kept for idempotent replay.
    pub(crate) fn on_response(&self, resp: &mut ResponseHeader, ctx: &mut Ctx) {
        // Captured before this request's RateLimit headers: a replay must
        // not carry stale quota figures.
        if let Some(i) = ctx.res.idem.as_mut() {
            i.status = resp.status.as_u16();
            i.headers = resp
                .headers
                .iter()
                .filter(|(k, _)| !is_hop_header(k.as_str()))
                .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect();
        }
        if let Some(d) = &ctx.res.rate {
            let _ = resp.insert_header("ratelimit-policy", d.policy_header());
            let _ = resp.insert_header("ratelimit", d.ratelimit_header());
        }
    }

    /// `request_body_filter`: hash the first idempotent request's body.
    pub(crate) fn on_request_body(&self, body: &Option<Bytes>, ctx: &mut Ctx) {
        if let (Some(i), Some(b)) = (ctx.res.idem.as_mut(), body) {
            if let Some(h) = i.hasher.as_mut() {
                h.update(b);
            }
        }
    }

    /// `response_body_filter`: keep the first idempotent response's body,
    /// up to the size limit.
    pub(crate) fn on_response_body(&self, body: &Option<Bytes>, ctx: &mut Ctx) {
        let (Some(i), Some(b)) = (ctx.res.idem.as_mut(), body) else {
            return;
        };
        if i.too_large {
            return;
        }
        if i.body.len() + b.len() > i.claim.max_response_bytes() {
            i.too_large = true;
            i.body = BytesMut::new();
        } else {
            i.body.extend_from_slice(b);
        }
    }

    /// `logging`: a complete response from the app completes the claim; a
    /// failure abandons it (dropped with the context), so a retry runs.
    pub(crate) fn finish_idempotency(&self, ctx: &mut Ctx, ok: bool) {
        let Some(i) = ctx.res.idem.take() else {
            return;
        };
        if !ok || ctx.reason.is_some() || i.status == 0 {
            return;
        }
        let request_hash = match (i.hash, i.hasher) {
            (Some(h), _) => h,
            (None, Some(h)) => h.finish(),
            (None, None) => return,
        };
        let response = (!i.too_large).then(|| idempotency::StoredResponse {
            status: i.status,
            headers: i.headers,
            body: i.body.freeze(),
        });
        i.claim.complete(Completed {
            request_hash,
            response,
        });
        if let Some(store) = &self.rt.idempotency {
            self.rt
                .metrics
                .resilience
                .idempotency_keys
                .set(store.stats().entries as i64);
        }
    }
}

impl IdemCtx {
    fn new(claim: Claim, hasher: Option<RequestHasher>, hash: Option<[u8; 32]>) -> Self {
        IdemCtx {
            claim,
            hasher,
            hash,
            status: 0,
            headers: Vec::new(),
            body: BytesMut::new(),
            too_large: false,
        }
    }
}

/// The endpoint affinity of a non-idempotent request with an
/// `Idempotency-Key`: a hash of the key, the same in every sidecar.
fn idempotency_affinity(req: &pingora_http::RequestHeader) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if req.method.is_idempotent() {
        return None;
    }
    let key = req.headers.get(IDEMPOTENCY_KEY)?;
    // SipHash with fixed keys: stable across processes and hosts.
    let mut h = std::hash::DefaultHasher::new();
    key.as_bytes().hash(&mut h);
    Some(h.finish())
}

/// Headers that describe one connection's framing, not the response.
fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_headers_on_passing_responses_follow_the_setting() {
        use crank_api::proxy::RateLimitHeaders::*;
        let cases: &[(crank_api::proxy::RateLimitHeaders, u32, u32, bool)] = &[
            (NearLimit, 100, 100, false),
            (NearLimit, 26, 100, false),
            (NearLimit, 25, 100, true),
            (NearLimit, 0, 100, true),
            (NearLimit, 1, 5, true),
            (NearLimit, 2, 5, false),
            (Always, 100, 100, true),
            (Never, 0, 100, false),
        ];
        for (mode, remaining, burst, want) in cases {
            assert_eq!(
                mode.on_allowed(*remaining, *burst),
                *want,
                "{mode:?} {remaining}/{burst}"
            );
        }
    }

    #[test]
    fn idempotency_keys_map_to_a_stable_endpoint() {
        let req = |method: &str, key: Option<&str>| {
            let mut r = pingora_http::RequestHeader::build(method, b"/", None).unwrap();
            if let Some(k) = key {
                r.insert_header(IDEMPOTENCY_KEY, k).unwrap();
            }
            r
        };
        let a = idempotency_affinity(&req("POST", Some("job-1")));
        assert!(a.is_some());
        assert_eq!(a, idempotency_affinity(&req("POST", Some("job-1"))));
        assert_ne!(a, idempotency_affinity(&req("POST", Some("job-2"))));
        assert_eq!(idempotency_affinity(&req("GET", Some("job-1"))), None);
        assert_eq!(idempotency_affinity(&req("POST", None)), None);
    }

    #[test]
    fn hop_headers_are_not_replayed() {
        assert!(is_hop_header("transfer-encoding"));
        assert!(is_hop_header("content-length"));
        assert!(!is_hop_header("content-type"));
        assert!(!is_hop_header("etag"));
    }
}
