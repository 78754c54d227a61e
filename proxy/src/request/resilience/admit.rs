//! `admit`: the resilience checks before a request goes upstream, in
//! order: quota → fault (outbound) → idempotency (inbound) → concurrency
//! slot. Each returns a refusal when its mechanism says no.

use pingora_proxy::Session;
use tokio::time::Instant;

use super::replay::idempotency_affinity;
use super::IdemCtx;
use crate::direction::Direction;
use crate::errors::{Reason, Refusal};
use crate::request::{claimed_capability, Ctx, MeshProxy};
use crate::resilience::ratelimit::Quotas;
use crate::resilience::shed::Shed;
use crate::resilience::{fault, retry_after_secs};
use crate::routing::Route;

/// Why `admit` stopped a request.
pub(crate) enum Stop {
    /// Answer with this refusal.
    Refused(Refusal),
    /// Already answered (an idempotent replay).
    Answered,
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused(r)
    }
}

impl MeshProxy {
    /// The resilience checks before a request goes upstream.
    pub(crate) async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Stop> {
        self.check_quota(session, ctx)?;
        match (self.direction, ctx.route.clone()) {
            (Direction::Outbound, Some(route)) => {
                if let Some(f) = &route.cfg.fault {
                    inject_faults(&route, f, &self.rt.metrics).await?;
                }
                route.state.budget.deposit();
                ctx.res.affinity = idempotency_affinity(session.req_header());
                ctx.res.deadline = route.cfg.timeout.map(|t| Instant::now() + t);
            }
            _ => self.check_idempotency(session, ctx).await?,
        }
        self.take_slot(ctx).await?;
        Ok(())
    }

    /// The quota of the request's (tenant, capability): 429 when spent.
    fn check_quota(&self, session: &Session, ctx: &mut Ctx) -> Result<(), Refusal> {
        let quotas = self.rt.quotas.load();
        let mut from_header = false;
        let req = session.req_header();
        // Borrowed, not copied: the config (for the inbound capability)
        // stays loaded while the names are in use.
        let cfg;
        let (q, tenant, capability): (&Quotas, &str, &str) = match self.direction {
            Direction::Inbound => {
                if quotas.inbound.is_empty() {
                    return Ok(());
                }
                let tenant = ctx.peer.as_ref().map_or("", |p| p.tenant.as_str());
                cfg = self.rt.config.load();
                let configured = cfg.inbound.as_ref().and_then(|i| i.capability.as_deref());
                let cap = configured
                    .or_else(|| claimed_capability(req))
                    .unwrap_or_default();
                (&quotas.inbound, tenant, cap)
            }
            Direction::Outbound => {
                if quotas.outbound.is_empty() {
                    return Ok(());
                }
                let header = quotas
                    .tenant_header
                    .as_ref()
                    .and_then(|h| req.headers.get(h).and_then(|v| v.to_str().ok()));
                from_header = header.is_some();
                let tenant = header.unwrap_or(self.rt.me.tenant.as_str());
                let cap = ctx
                    .route
                    .as_ref()
                    .map_or("", |r| r.capability.as_deref().unwrap_or(r.name.as_str()));
                (&quotas.outbound, tenant, cap)
            }
        };
        let Some(d) = q.check(tenant, capability) else {
            return Ok(());
        };
        if d.allowed {
            if quotas.headers.on_allowed(d.remaining, d.burst) {
                ctx.res.rate = Some(d);
            }
            return Ok(());
        }
        // A tenant named by the caller's header (edge traffic) is not a
        // label: callers could make series without bound.
        let label = if from_header {
            "(tenant_header)"
        } else {
            tenant
        };
        self.rt
            .metrics
            .resilience
            .ratelimited
            .with_label_values(&[self.direction.as_str(), label, capability])
            .inc();
        let detail = format!(
            "tenant {tenant:?}, capability {capability:?}, quota {} ({} per {}s)",
            d.policy, d.quota, d.window_secs
        );
        Err(Refusal::new(Reason::RateLimited, detail)
            .header("retry-after", d.retry_after_secs.to_string())
            .header("ratelimit-policy", d.policy_header())
            .header("ratelimit", d.ratelimit_header()))
    }

    /// The route's or the app's concurrency slot: 503 when the limit and
    /// its queue are full, or the wait timed out.
    async fn take_slot(&self, ctx: &mut Ctx) -> Result<(), Refusal> {
        let route = ctx.route.clone();
        let limiter = match self.direction {
            Direction::Inbound => self.rt.inbound_limiter.as_ref(),
            Direction::Outbound => route.as_ref().and_then(|r| r.state.limiter.as_ref()),
        };
        let Some(l) = limiter else {
            return Ok(());
        };
        let shed = match l.acquire().await {
            Ok(p) => {
                ctx.res.permit = Some(p);
                return Ok(());
            }
            Err(s) => s,
        };
        let label = ctx.route_label(self.direction);
        self.count_shed(ctx, shed.as_str());
        let reason = match shed {
            Shed::QueueFull => Reason::Overloaded,
            Shed::QueueTimeout => Reason::QueueTimeout,
        };
        let detail = format!("{label}: {} running, {} waiting", l.in_use(), l.waiting());
        let ra = retry_after_secs(l.retry_after).to_string();
        Err(Refusal::new(reason, detail).header("retry-after", ra))
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
}

/// The route's fault injection: a delay, then maybe an abort with the
/// configured status.
async fn inject_faults(
    route: &Route,
    cfg: &crank_api::proxy::FaultConfig,
    metrics: &crate::metrics::Metrics,
) -> Result<(), Refusal> {
    let f = fault::roll(cfg);
    let m = &metrics.resilience.faults;
    if let Some(d) = f.delay {
        m.with_label_values(&[route.name.as_str(), "delay"]).inc();
        tokio::time::sleep(d).await;
    }
    let Some(status) = f.abort else {
        return Ok(());
    };
    m.with_label_values(&[route.name.as_str(), "abort"]).inc();
    let detail = format!("route {}, abort with {status}", route.name);
    Err(Refusal::new(Reason::FaultInjected, detail).with_status(status))
}

impl IdemCtx {
    pub(super) fn new(
        claim: crate::resilience::idempotency::Claim,
        hasher: Option<crate::resilience::idempotency::RequestHasher>,
        hash: Option<[u8; 32]>,
    ) -> Self {
        IdemCtx {
            claim,
            hasher,
            hash,
            status: 0,
            headers: Vec::new(),
            body: bytes::BytesMut::new(),
            too_large: false,
        }
    }
}
