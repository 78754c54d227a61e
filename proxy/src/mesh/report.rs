//! Traffic reports to crank-control (`mesh.report_interval`): every period
//! this proxy posts the cumulative values of `crank_requests_total` and
//! `crank_request_duration_seconds` and the refusals since its last
//! accepted report to `POST /v1/mesh/report`, over the same mTLS client as
//! the watch. crank-control's dashboard turns them into rates. A failed
//! post is logged at debug (a 4xx refusal, which the next report would get
//! too, once at warn) and its refusals go with the next one; nothing here
//! touches a request. Series are sorted, outbound first, before they are
//! cut to the caps, so the kept subset is the same every period.
//!
//! The refusals come from [`RefusalRing`], which the one place the proxy
//! writes its own responses (`crate::request::respond`) fills with
//! policy denials and shed or limited requests ([`is_reported`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crank_api::report::{
    clip_path, LatencyHistogram, RefusalEvent, RequestCount, TrafficReport, MAX_LATENCY_SERIES,
    MAX_REFUSALS, MAX_REQUEST_SERIES,
};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;

use super::Handles;
use super::{credentials, Mesh};
use crate::errors::Reason;
use crate::metrics::Metrics;

/// Deadline of one report post.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The refusals the dashboard shows: policy denials (and a policy that
/// could not be evaluated) and requests shed or limited by a quota, the
/// concurrency limit, its queue or an open circuit.
pub fn is_reported(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::PolicyDenied
            | Reason::PolicyError
            | Reason::RateLimited
            | Reason::Overloaded
            | Reason::QueueTimeout
            | Reason::CircuitOpen
    )
}

/// The newest refusals not reported yet, at most [`MAX_REFUSALS`]. Writers
/// never wait: when the lock is taken (the report task draining it), the
/// refusal is left out.
#[derive(Debug, Default)]
pub struct RefusalRing {
    q: Mutex<VecDeque<RefusalEvent>>,
}

impl RefusalRing {
    pub fn push(&self, e: RefusalEvent) {
        self.push_with(|| e);
    }

    /// Makes the refusal with `make` only when the ring is free: a refusal
    /// path that would lose it anyway does not format its strings.
    pub fn push_with(&self, make: impl FnOnce() -> RefusalEvent) {
        if let Ok(mut q) = self.q.try_lock() {
            if q.len() >= MAX_REFUSALS {
                q.pop_front();
            }
            q.push_back(make());
        }
    }

    /// Takes every refusal, oldest first.
    pub fn drain(&self) -> Vec<RefusalEvent> {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }
}

/// A refusal as the report carries it, stamped now.
pub fn event(
    direction: &str,
    status: u16,
    reason: Reason,
    route: &str,
    method: &str,
    path: &str,
    source: Option<String>,
) -> RefusalEvent {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    RefusalEvent {
        at_ms,
        direction: direction.to_string(),
        status,
        reason: reason.as_str().to_string(),
        route: route.to_string(),
        method: method.to_string(),
        path: clip_path(path),
        source,
    }
}

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// Outbound first (what the dashboard's edges and SLOs read), then by
/// route and the rest: a stable order to cut at the caps.
fn series_key<'a>(direction: &'a str, route: &'a str) -> (bool, &'a str, &'a str) {
    (direction != "outbound", route, direction)
}

/// `crank_requests_total`'s series, at most [`MAX_REQUEST_SERIES`]
/// (outbound first).
pub fn request_counts(families: &[MetricFamily]) -> Vec<RequestCount> {
    let mut out: Vec<RequestCount> = families
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| RequestCount {
            direction: label(m, "direction").to_string(),
            route: label(m, "route").to_string(),
            status_class: label(m, "status_class").to_string(),
            count: m.get_counter().get_value() as u64,
        })
        .collect();
    out.sort_by(|a, b| {
        (series_key(&a.direction, &a.route), &a.status_class)
            .cmp(&(series_key(&b.direction, &b.route), &b.status_class))
    });
    out.truncate(MAX_REQUEST_SERIES);
    out
}

/// `crank_request_duration_seconds`'s series (finite buckets), at most
/// [`MAX_LATENCY_SERIES`] (outbound first).
pub fn latency_histograms(families: &[MetricFamily]) -> Vec<LatencyHistogram> {
    let mut out: Vec<LatencyHistogram> = families
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| {
            let h = m.get_histogram();
            let finite = h
                .get_bucket()
                .iter()
                .filter(|b| b.upper_bound().is_finite());
            LatencyHistogram {
                direction: label(m, "direction").to_string(),
                route: label(m, "route").to_string(),
                bounds: finite.clone().map(|b| b.upper_bound()).collect(),
                counts: finite.map(|b| b.cumulative_count()).collect(),
                count: h.get_sample_count(),
                sum: h.get_sample_sum(),
            }
        })
        .collect();
    out.sort_by(|a, b| series_key(&a.direction, &a.route).cmp(&series_key(&b.direction, &b.route)));
    out.truncate(MAX_LATENCY_SERIES);
    out
}

/// The report of this instance now, with `refusals`.
pub fn build(
    metrics: &Metrics,
    instance: &str,
    every: Duration,
    refusals: Vec<RefusalEvent>,
) -> TrafficReport {
    TrafficReport {
        instance: instance.to_string(),
        interval_ms: every.as_millis() as u64,
        requests: request_counts(&metrics.requests.collect()),
        latency: latency_histograms(&metrics.latency.collect()),
        refusals,
    }
}

/// Adds the newly drained refusals to the ones not yet accepted, keeping
/// the newest [`MAX_REFUSALS`].
pub fn pending(mut held: Vec<RefusalEvent>, new: Vec<RefusalEvent>) -> Vec<RefusalEvent> {
    held.extend(new);
    let extra = held.len().saturating_sub(MAX_REFUSALS);
    held.drain(..extra);
    held
}

/// Posts a report every `mesh.report_interval` until the process exits;
/// returns at once when it is `0s`.
pub async fn run(mesh: &Mesh, handles: &Handles) {
    let every = mesh.cfg.report_interval;
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = Vec::new();
    let mut refused = WarnOnce::default();
    loop {
        tick.tick().await;
        held = pending(held, mesh.refusals.drain());
        let report = build(&handles.metrics, &mesh.instance, every, held.clone());
        let result = post(mesh, handles, &report).await;
        let warn = refused.should_warn(result.as_ref().err().and_then(|e| e.0));
        match result {
            Ok(()) => held.clear(),
            Err(NotAccepted(_, e)) if warn => {
                tracing::warn!(error = %e, "crank-control refuses this proxy's traffic reports (said once until one is accepted); its dashboard misses this proxy")
            }
            Err(NotAccepted(_, e)) => {
                tracing::debug!(error = %e, refusals = held.len(), "traffic report not accepted; the next one carries its refusals")
            }
        }
    }
}

/// Why a report was not accepted: crank-control's status when it answered
/// with an error, and the message.
struct NotAccepted(Option<u16>, String);

/// Warns about a 4xx refusal once, not every period: again only after a
/// report was accepted (or answered otherwise) in between.
#[derive(Debug, Default)]
struct WarnOnce {
    warned: bool,
}

impl WarnOnce {
    /// `status`: the refusal's, `None` when accepted or not answered.
    fn should_warn(&mut self, status: Option<u16>) -> bool {
        let refused = status.is_some_and(|s| (400..500).contains(&s));
        let first = refused && !self.warned;
        self.warned = refused;
        first
    }
}

async fn post(mesh: &Mesh, handles: &Handles, report: &TrafficReport) -> Result<(), NotAccepted> {
    let (cert, roots) = credentials(&handles.tls).map_err(|e| NotAccepted(None, e))?;
    let _: serde_json::Value = mesh
        .client
        .post_json(&roots, Some(&cert), "/v1/mesh/report", report, CALL_TIMEOUT)
        .await
        .map_err(|e| {
            let status = match &e {
                crate::enroll::client::CallError::Refused { status, .. } => Some(*status),
                _ => None,
            };
            NotAccepted(status, e.to_string())
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at_ms: u64) -> RefusalEvent {
        RefusalEvent {
            at_ms,
            direction: "inbound".into(),
            status: 403,
            reason: "policy-denied".into(),
            route: "app".into(),
            method: "GET".into(),
            path: "/".into(),
            source: None,
        }
    }

    #[test]
    fn reported_refusals_are_denials_and_shedding() {
        let cases = [
            (Reason::PolicyDenied, true),
            (Reason::PolicyError, true),
            (Reason::RateLimited, true),
            (Reason::Overloaded, true),
            (Reason::QueueTimeout, true),
            (Reason::CircuitOpen, true),
            (Reason::NoRoute, false),
            (Reason::UpstreamConnectFailed, false),
            (Reason::RequestTimeout, false),
            (Reason::FaultInjected, false),
        ];
        for (reason, want) in cases {
            assert_eq!(is_reported(reason), want, "{reason:?}");
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_drains_oldest_first() {
        let ring = RefusalRing::default();
        for t in 0..(MAX_REFUSALS as u64 + 5) {
            ring.push(ev(t));
        }
        let got = ring.drain();
        assert_eq!(got.len(), MAX_REFUSALS);
        assert_eq!((got[0].at_ms, got.last().unwrap().at_ms), (5, 54));
        assert!(ring.drain().is_empty());
        // While the report task holds the ring, nothing is even made.
        let held = ring.q.lock().unwrap();
        ring.push_with(|| panic!("made while the ring is taken"));
        drop(held);
        ring.push_with(|| ev(7));
        assert_eq!(ring.drain().len(), 1);
    }

    #[test]
    fn unaccepted_refusals_wait_for_the_next_report() {
        let held = pending(vec![ev(1), ev(2)], vec![ev(3)]);
        assert_eq!(held.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [1, 2, 3]);
        let many = pending(held, (10..60).map(ev).collect());
        assert_eq!(many.len(), MAX_REFUSALS);
        assert_eq!(many[0].at_ms, 10, "the oldest go first");
    }

    #[test]
    fn a_4xx_refusal_is_warned_about_once() {
        let mut w = WarnOnce::default();
        let seen: Vec<bool> = [
            None,
            Some(400),
            Some(400),
            Some(429),
            Some(503),
            None,
            Some(403),
            Some(403),
        ]
        .into_iter()
        .map(|s| w.should_warn(s))
        .collect();
        assert_eq!(seen, [false, true, false, false, false, false, true, false]);
    }

    #[test]
    fn series_are_cut_to_the_caps_outbound_first_in_a_stable_order() {
        let m = Metrics::new();
        for i in 0..MAX_REQUEST_SERIES {
            m.requests
                .with_label_values(&["inbound", &format!("in{i:04}"), "2xx"])
                .inc();
            m.latency
                .with_label_values(&["inbound", &format!("in{i:04}")])
                .observe(0.01);
        }
        m.requests
            .with_label_values(&["outbound", "zz-out", "5xx"])
            .inc();
        m.latency
            .with_label_values(&["outbound", "zz-out"])
            .observe(0.01);
        let r = build(&m, "ab12", Duration::from_secs(10), vec![]);
        assert_eq!(r.requests.len(), MAX_REQUEST_SERIES);
        assert_eq!(
            (
                r.requests[0].direction.as_str(),
                r.requests[0].route.as_str()
            ),
            ("outbound", "zz-out")
        );
        assert_eq!(r.requests[1].route, "in0000");
        assert_eq!(
            r.requests.last().unwrap().route,
            format!("in{:04}", MAX_REQUEST_SERIES - 2)
        );
        assert_eq!(r.latency.len(), MAX_LATENCY_SERIES);
        assert_eq!(r.latency[0].route, "zz-out");
        assert_eq!(r.latency[1].route, "in0000");
        assert_eq!(
            build(&m, "ab12", Duration::from_secs(10), vec![]),
            r,
            "the same every period"
        );
    }

    #[test]
    fn the_report_carries_the_metrics_cumulative_values() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["outbound", "hello", "2xx"])
            .inc_by(7);
        m.requests
            .with_label_values(&["outbound", "hello", "5xx"])
            .inc_by(2);
        let h = m.latency.with_label_values(&["outbound", "hello"]);
        h.observe(0.003);
        h.observe(0.2);
        let r = build(&m, "ab12", Duration::from_secs(10), vec![ev(1)]);
        assert_eq!((r.instance.as_str(), r.interval_ms), ("ab12", 10_000));
        let mut counts: Vec<(String, u64)> = r
            .requests
            .iter()
            .map(|c| {
                (
                    format!("{} {} {}", c.direction, c.route, c.status_class),
                    c.count,
                )
            })
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("outbound hello 2xx".to_string(), 7),
                ("outbound hello 5xx".to_string(), 2)
            ]
        );
        let l = &r.latency[0];
        assert_eq!(
            (l.count, l.bounds.len(), l.counts.len()),
            (2, l.bounds.len(), l.bounds.len())
        );
        let at = |b: f64| l.counts[l.bounds.iter().position(|x| *x == b).unwrap()];
        assert_eq!((at(0.001), at(0.005), at(0.1), at(0.25)), (0, 1, 1, 2));
        l.validate().unwrap();
        r.validate().unwrap();
        assert_eq!(r.refusals.len(), 1);
    }
}
