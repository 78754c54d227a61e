//! Pure functions from the stored reports, the CA state, the registry and
//! the published SLOs to the dashboard's rows. Rates come from the delta
//! between an instance's last two reports; a counter that went down (the
//! proxy restarted under the same instance id) counts from zero, as
//! Prometheus' `rate()` does.

use std::collections::{BTreeMap, HashMap};

use crank_api::report::{LatencyHistogram, TrafficReport};

use super::store::InstanceReports;
use super::{CertInfo, Edge, SloInfo, WorkloadInfo};
use crate::registry::Entry;
use crate::server::state::{CaState, IntermediateState};
use crate::slo::CapabilitySlo;

/// A CA certificate is `expiring` with less than this left (30 days).
pub const CA_EXPIRING_SECS: i64 = 30 * 24 * 3600;

/// A failed request, as the Prometheus rules and `crankctl slo status`
/// count it: a 5xx, or no response at all (`error`).
fn is_error(status_class: &str) -> bool {
    matches!(status_class, "5xx" | "error")
}

/// `later - earlier` of a cumulative counter; `later` when it went down.
fn delta(later: u64, earlier: u64) -> u64 {
    if later >= earlier {
        later - earlier
    } else {
        later
    }
}

/// The `q` quantile of cumulative buckets, interpolated inside the bucket
/// as Prometheus' `histogram_quantile` does; the largest bound when it
/// falls in `+Inf`; `None` without observations.
pub fn quantile(q: f64, bounds: &[f64], counts: &[u64], count: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    // In the `+Inf` bucket: the largest finite bound is all that is known.
    let Some(i) = counts.iter().position(|c| *c as f64 >= rank) else {
        return bounds.last().copied();
    };
    let upper = bounds[i];
    let (lower, below) = match i {
        0 => (0.0, 0),
        _ => (bounds[i - 1], counts[i - 1]),
    };
    let inside = counts[i].saturating_sub(below);
    if inside == 0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / inside as f64)
}

/// Sums per edge while the instances are folded in.
#[derive(Debug, Default)]
struct EdgeSum {
    requests: u64,
    errors: u64,
    /// Over the last interval of each live instance.
    rps: f64,
    window_requests: u64,
    window_errors: u64,
    /// Bounds and per-bucket deltas (cumulative), plus their `+Inf` count.
    hist: Option<(Vec<f64>, Vec<u64>, u64)>,
}

impl EdgeSum {
    fn add_hist(&mut self, last: &LatencyHistogram, prev: Option<&LatencyHistogram>) {
        let prev = prev.filter(|p| p.bounds == last.bounds);
        let counts: Vec<u64> = last
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| delta(*c, prev.map_or(0, |p| p.counts[i])))
            .collect();
        let count = delta(last.count, prev.map_or(0, |p| p.count));
        match &mut self.hist {
            None => self.hist = Some((last.bounds.clone(), counts, count)),
            Some((b, c, n)) if *b == last.bounds => {
                c.iter_mut()
                    .zip(counts)
                    .for_each(|(a, d)| *a = a.saturating_add(d));
                *n = n.saturating_add(count);
            }
            // Another bucket layout (a different proxy version): left out.
            Some(_) => {}
        }
    }
}

/// `(direction, route, status_class) -> count` of a report.
fn counts(r: &TrafficReport) -> HashMap<(&str, &str, &str), u64> {
    r.requests
        .iter()
        .map(|c| {
            (
                (
                    c.direction.as_str(),
                    c.route.as_str(),
                    c.status_class.as_str(),
                ),
                c.count,
            )
        })
        .collect()
}

/// Folds one instance's outbound series into `sums`, keyed by route.
fn fold_instance(sums: &mut BTreeMap<String, EdgeSum>, r: &InstanceReports, now_ms: i64) {
    let prev = r.prev.as_ref().filter(|_| r.is_live(now_ms));
    let secs = prev.map(|p| (r.last.at_ms - p.at_ms) as f64 / 1000.0);
    let before = prev.map(|p| counts(&p.report)).unwrap_or_default();
    for c in r
        .last
        .report
        .requests
        .iter()
        .filter(|c| c.direction == "outbound")
    {
        if c.route == "none" {
            continue; // no route matched: no destination
        }
        let s = sums.entry(c.route.clone()).or_default();
        let err = is_error(&c.status_class);
        s.requests = s.requests.saturating_add(c.count);
        s.errors = s.errors.saturating_add(if err { c.count } else { 0 });
        if let Some(secs) = secs.filter(|s| *s > 0.0) {
            let key = (
                c.direction.as_str(),
                c.route.as_str(),
                c.status_class.as_str(),
            );
            let d = delta(c.count, before.get(&key).copied().unwrap_or(0));
            s.rps += d as f64 / secs;
            s.window_requests = s.window_requests.saturating_add(d);
            s.window_errors = s.window_errors.saturating_add(if err { d } else { 0 });
        }
    }
    let Some(prev) = prev else { return };
    for h in r
        .last
        .report
        .latency
        .iter()
        .filter(|h| h.direction == "outbound")
    {
        if let Some(s) = sums.get_mut(&h.route) {
            let p = prev
                .report
                .latency
                .iter()
                .find(|p| p.direction == h.direction && p.route == h.route);
            s.add_hist(h, p);
        }
    }
}

/// Calls between workloads: each reporting identity's outbound routes,
/// the destination being the route's capability (`capability_of`, else
/// the route's name).
pub fn edges(
    instances: &[&InstanceReports],
    capability_of: &HashMap<String, String>,
    now_ms: i64,
) -> Vec<Edge> {
    let mut by_source: BTreeMap<&str, BTreeMap<String, EdgeSum>> = BTreeMap::new();
    for r in instances {
        fold_instance(by_source.entry(&r.identity).or_default(), r, now_ms);
    }
    let mut out = Vec::new();
    for (source, routes) in by_source {
        for (route, s) in routes {
            let success_rate = (s.window_requests > 0)
                .then(|| 1.0 - s.window_errors as f64 / s.window_requests as f64);
            let p99_ms = s
                .hist
                .as_ref()
                .and_then(|(b, c, n)| quantile(0.99, b, c, *n))
                .map(|secs| secs * 1000.0);
            out.push(Edge {
                source: source.to_string(),
                destination: capability_of.get(&route).cloned().unwrap_or(route.clone()),
                route,
                rps: s.rps,
                success_rate,
                requests: s.requests,
                errors: s.errors,
                p99_ms,
            });
        }
    }
    out
}

/// Each SLO against the outbound requests of its routes (as the
/// Prometheus rules measure it), summed over the latest report of every
/// instance kept: cumulative since those proxies started.
pub fn slos(objectives: &[CapabilitySlo], instances: &[&InstanceReports]) -> Vec<SloInfo> {
    objectives
        .iter()
        .map(|o| {
            let (mut requests, mut errors) = (0, 0);
            for c in instances
                .iter()
                .flat_map(|r| &r.last.report.requests)
                .filter(|c| c.direction == "outbound" && o.routes.contains(&c.route))
            {
                requests = c.count.saturating_add(requests);
                if is_error(&c.status_class) {
                    errors = c.count.saturating_add(errors);
                }
            }
            let sli = (requests > 0).then(|| 1.0 - errors as f64 / requests as f64);
            SloInfo {
                capability: o.capability.clone(),
                availability: o.availability,
                sli,
                budget_left: budget_left(sli, o.availability),
                requests,
                errors,
            }
        })
        .collect()
}

/// `1 - (1 - sli) / (1 - target)`: 1 while no error happened, 0 when the
/// budget is spent, negative when overspent. `None` without requests, or
/// without a budget (no target, or a 100% target).
pub fn budget_left(sli: Option<f64>, target: Option<f64>) -> Option<f64> {
    let (sli, target) = (sli?, target?);
    let budget = 1.0 - target;
    (budget > 0.0).then(|| 1.0 - (1.0 - sli) / budget)
}

/// The row of `id`, made on first use.
fn row<'a>(by_id: &'a mut BTreeMap<String, WorkloadInfo>, id: &str) -> &'a mut WorkloadInfo {
    by_id.entry(id.to_string()).or_insert_with(|| {
        let parsed = crank_certs::Identity::from_dns(id).ok();
        WorkloadInfo {
            identity: id.to_string(),
            service: parsed
                .as_ref()
                .map(|i| i.service.clone())
                .unwrap_or_default(),
            tenant: parsed.map(|i| i.tenant).unwrap_or_default(),
            ..Default::default()
        }
    })
}

/// Every identity seen in the reports or the registry, by identity.
pub fn workloads(
    instances: &[&InstanceReports],
    entries: &[Entry],
    now_ms: i64,
) -> Vec<WorkloadInfo> {
    let mut by_id: BTreeMap<String, WorkloadInfo> = BTreeMap::new();
    for e in entries.iter().filter(|e| !e.expires_in.is_zero()) {
        let w = row(&mut by_id, &e.registration.identity);
        w.endpoints += 1;
        for c in &e.registration.capabilities {
            if !w.capabilities.contains(c) {
                w.capabilities.push(c.clone());
            }
        }
    }
    for r in instances {
        let w = row(&mut by_id, &r.identity);
        w.proxies += usize::from(r.is_live(now_ms));
        let at = r.last.at_ms / 1000;
        w.last_report = Some(w.last_report.map_or(at, |t| t.max(at)));
    }
    let mut out: Vec<WorkloadInfo> = by_id.into_values().collect();
    out.iter_mut().for_each(|w| w.capabilities.sort());
    out
}

fn cert(kind: &str, subject: &str, serial: &str, not_after: i64, status: &str, t: i64) -> CertInfo {
    CertInfo {
        kind: kind.into(),
        subject: subject.into(),
        serial: serial.into(),
        not_after,
        seconds_left: not_after - t,
        status: status.into(),
    }
}

/// `expired`, else `expiring` under `warn` seconds left, else `valid`.
fn expiry(left: i64, warn: i64) -> &'static str {
    if left <= 0 {
        "expired"
    } else if left < warn {
        "expiring"
    } else {
        "valid"
    }
}

/// Roots, intermediates in use (retired ones left out) and the newest
/// leaf of each workload instance. A CA certificate is expiring with less
/// than 30 days left, a leaf with less than a third of its life left.
pub fn certs(st: &CaState, t: i64) -> Vec<CertInfo> {
    let mut out = Vec::new();
    for r in &st.roots {
        let status = expiry(r.not_after - t, CA_EXPIRING_SECS);
        out.push(cert("root", &r.subject, &r.serial, r.not_after, status, t));
    }
    for i in st
        .intermediates
        .iter()
        .filter(|i| i.state != IntermediateState::Retired)
    {
        let status = expiry(i.not_after - t, CA_EXPIRING_SECS);
        out.push(cert(
            "intermediate",
            &i.subject,
            &i.serial,
            i.not_after,
            status,
            t,
        ));
    }
    let mut newest: BTreeMap<(String, &str), &crate::server::state::Issued> = BTreeMap::new();
    for i in &st.inventory {
        let key = (i.identity.dns_name(), i.instance.as_str());
        if newest.get(&key).is_none_or(|n| n.issued_at <= i.issued_at) {
            newest.insert(key, i);
        }
    }
    for ((name, _), i) in newest {
        let status = if st.is_revoked(&i.serial) {
            "revoked"
        } else {
            expiry(i.not_after - t, (i.not_after - i.not_before) / 3)
        };
        out.push(cert("leaf", &name, &i.serial, i.not_after, status, t));
    }
    out
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
