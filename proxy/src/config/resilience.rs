//! Config checks of the resilience settings: quotas, concurrency limits,
//! idempotency, and each route's timeout, retries, circuit and faults.

use std::time::Duration;

use crank_api::proxy::{ConcurrencyConfig, ProxyConfig};

use super::Problems;

/// Quotas, concurrency limits, retries, circuits, faults, idempotency:
/// numbers in range, rates that parse.
pub(super) fn validate_resilience(cfg: &ProxyConfig, p: &mut Problems) {
    validate_quotas(&cfg.quotas, p);
    if let Some(inb) = &cfg.inbound {
        if let Some(c) = &inb.concurrency {
            validate_concurrency("inbound.concurrency".into(), c, p);
        }
        validate_idempotency(&inb.idempotency, p);
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        validate_route(&format!("routes[{i}]"), r, p);
    }
}

fn validate_quotas(q: &crank_api::proxy::QuotaConfig, p: &mut Problems) {
    for (i, l) in q.limits.iter().enumerate() {
        let f = format!("quotas.limits[{i}]");
        if let Err(m) = crate::resilience::parse_rate(&l.rate) {
            p.push((format!("{f}.rate"), m));
        }
        if l.burst == Some(0) {
            p.push((format!("{f}.burst"), "is 0, which lets nothing pass; use at least 1, or leave it out to equal the rate's count".into()));
        }
        if l.tenant.is_empty() || l.capability.is_empty() {
            p.push((
                f,
                "tenant and capability must be set; use \"*\" to match any".into(),
            ));
        }
    }
    if let Some(h) = &q.tenant_header {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            p.push((
                "quotas.tenant_header".into(),
                format!("{h:?} is not a valid header name; use a token such as x-tenant"),
            ));
        }
    }
    if q.max_keys == 0 {
        p.push((
            "quotas.max_keys".into(),
            "is 0; use at least 1 (default 100000)".into(),
        ));
    }
}

fn validate_concurrency(f: String, c: &ConcurrencyConfig, p: &mut Problems) {
    if c.max_concurrent == 0 {
        p.push((
            format!("{f}.max_concurrent"),
            "is 0, which refuses every request; use at least 1, or remove the section".into(),
        ));
    }
    if c.queue_timeout.is_zero() && c.max_queue > 0 {
        p.push((format!("{f}.queue_timeout"), "is zero while max_queue lets requests wait; give a wait such as 1s, or set max_queue to 0".into()));
    }
}

fn validate_idempotency(id: &crank_api::proxy::IdempotencyConfig, p: &mut Problems) {
    if id.enabled && id.max_response_bytes > id.max_total_bytes {
        p.push(("inbound.idempotency.max_response_bytes".into(), "is larger than max_total_bytes, so such a response could never be kept; lower it or raise max_total_bytes".into()));
    }
    if id.enabled && (id.ttl.is_zero() || id.max_entries == 0 || id.max_total_bytes == 0) {
        p.push(("inbound.idempotency".into(), "ttl, max_entries and max_total_bytes must be above zero; set enabled: false to turn replay off".into()));
    }
}

fn validate_route(f: &str, r: &crank_api::proxy::RouteConfig, p: &mut Problems) {
    if let Some(c) = &r.concurrency {
        validate_concurrency(format!("{f}.concurrency"), c, p);
    }
    if r.timeout.is_some_and(|t| t.is_zero()) {
        p.push((
            format!("{f}.timeout"),
            "is zero; give a deadline such as 10s, or leave it out".into(),
        ));
    }
    validate_retry(f, &r.retry, p);
    validate_circuit(f, &r.circuit, p);
    if let Some(fault) = &r.fault {
        validate_fault(f, fault, p);
    }
}

fn validate_retry(f: &str, rt: &crank_api::proxy::RetryConfig, p: &mut Problems) {
    if rt.attempts > 10 {
        p.push((
            format!("{f}.retry.attempts"),
            format!("{} is too many; use 0 to 10", rt.attempts),
        ));
    }
    if !(0.0..=10.0).contains(&rt.budget_ratio) {
        p.push((
            format!("{f}.retry.budget_ratio"),
            format!(
                "{} is out of range; use a share such as 0.2 (0.0 to 10.0)",
                rt.budget_ratio
            ),
        ));
    }
    if rt.backoff_base > rt.backoff_max {
        p.push((
            format!("{f}.retry.backoff_base"),
            "is longer than backoff_max; make backoff_max at least backoff_base".into(),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&rt.budget_window) {
        p.push((
            format!("{f}.retry.budget_window"),
            "is out of range; use 1s to 60s".into(),
        ));
    }
}

fn validate_circuit(f: &str, c: &crank_api::proxy::CircuitConfig, p: &mut Problems) {
    if c.max_ejected_percent > 100 {
        p.push((
            format!("{f}.circuit.max_ejected_percent"),
            format!("{} is over 100", c.max_ejected_percent),
        ));
    }
    for (j, st) in c.failure_statuses.iter().enumerate() {
        if !(500..=599).contains(st) {
            p.push((
                format!("{f}.circuit.failure_statuses[{j}]"),
                format!("{st} is not a 5xx status; list server errors that say an endpoint is unhealthy, such as 502, 503, 504 (or 500)"),
            ));
        }
    }
    if c.consecutive_failures > 0 && (c.base_ejection.is_zero() || c.base_ejection > c.max_ejection)
    {
        p.push((
            format!("{f}.circuit.base_ejection"),
            "must be above zero and at most max_ejection".into(),
        ));
    }
}

fn validate_fault(f: &str, fault: &crank_api::proxy::FaultConfig, p: &mut Problems) {
    if let Some(d) = &fault.delay {
        if !(0.0..=100.0).contains(&d.percent) {
            p.push((
                format!("{f}.fault.delay.percent"),
                format!("{} is out of range; use 0 to 100", d.percent),
            ));
        }
    }
    if let Some(a) = &fault.abort {
        if !(0.0..=100.0).contains(&a.percent) {
            p.push((
                format!("{f}.fault.abort.percent"),
                format!("{} is out of range; use 0 to 100", a.percent),
            ));
        }
        if !(400..=599).contains(&a.status) {
            p.push((
                format!("{f}.fault.abort.status"),
                format!("{} is not an error status; use 400 to 599", a.status),
            ));
        }
    }
}
