//! The traffic report a `crank-proxy` pushes to crank-control
//! (`POST /v1/mesh/report`, mTLS) every `mesh.report_interval`: the
//! cumulative values of its request counter and latency histogram, and the
//! policy denials and shed or limited requests since its last report.
//! crank-control turns two consecutive reports of an instance into rates
//! for its dashboard. The reporting identity is the client certificate's,
//! never a field of the body.

use serde::{Deserialize, Serialize};

/// At most this many refusals in one report (the newest are kept).
pub const MAX_REFUSALS: usize = 50;
/// At most this many request series (direction × route × status class).
pub const MAX_REQUEST_SERIES: usize = 512;
/// At most this many latency series (direction × route).
pub const MAX_LATENCY_SERIES: usize = 256;
/// At most this many finite bucket bounds in one histogram.
pub const MAX_BUCKETS: usize = 32;
/// Longest route name, method, reason or identity kept (bytes).
pub const MAX_LABEL: usize = 256;
/// Longest request path kept (bytes); longer ones are cut.
pub const MAX_PATH: usize = 512;
/// The range of a report interval other than 0 (ms): 1 s to 10 min.
pub const INTERVAL_MS: std::ops::RangeInclusive<u64> = 1_000..=600_000;
/// The latest refusal time taken (Unix ms): 9999-12-31T23:59:59.999Z,
/// within what a JavaScript `Date` can show.
pub const MAX_AT_MS: u64 = 253_402_300_799_999;

/// One proxy instance's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficReport {
    /// The enrolled instance id (`identity.enroll.state_dir/instance`).
    pub instance: String,
    /// The proxy's `mesh.report_interval` in milliseconds: crank-control
    /// counts an instance as live while it reported within 3 of them.
    #[serde(default)]
    pub interval_ms: u64,
    /// `crank_requests_total`, cumulative since the proxy started.
    #[serde(default)]
    pub requests: Vec<RequestCount>,
    /// `crank_request_duration_seconds`, cumulative since the proxy started.
    #[serde(default)]
    pub latency: Vec<LatencyHistogram>,
    /// Policy denials and shed or limited requests since the last report
    /// that was accepted, oldest first, at most [`MAX_REFUSALS`].
    #[serde(default)]
    pub refusals: Vec<RefusalEvent>,
}

/// `crank_requests_total{direction, route, status_class}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestCount {
    /// `inbound` or `outbound`.
    pub direction: String,
    pub route: String,
    /// `2xx`, `3xx`, `4xx`, `5xx` (or `other`).
    pub status_class: String,
    pub count: u64,
}

/// `crank_request_duration_seconds{direction, route}`: Prometheus-style
/// cumulative bucket counts (`counts[i]` requests took at most
/// `bounds[i]` seconds; `count` is every request, the `+Inf` bucket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyHistogram {
    pub direction: String,
    pub route: String,
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
    /// Sum of the durations, seconds.
    pub sum: f64,
}

/// A request the proxy refused by itself: a policy denial, or a request
/// shed or limited (quota, concurrency limit, circuit open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalEvent {
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub status: u16,
    /// The `x-crank-error` value (`policy-denied`, `rate-limited`, ...).
    pub reason: String,
    /// The route's name (`app` inbound without a route, `none` outbound).
    pub route: String,
    pub method: String,
    /// The path without the query, at most [`MAX_PATH`] bytes.
    pub path: String,
    /// The caller's identity (DNS form) when known: the calling sidecar's
    /// inbound, this workload's own outbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Why crank-control refuses a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportError(pub String);

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReportError {}

impl TrafficReport {
    /// Checks the bounds crank-control holds a report to; the error names
    /// the field and the limit.
    pub fn validate(&self) -> Result<(), ReportError> {
        let bad = |m: String| Err(ReportError(m));
        if self.interval_ms != 0 && !INTERVAL_MS.contains(&self.interval_ms) {
            return bad(format!(
                "interval_ms is {}; it must be 0 (not said) or 1000 to 600000 (mesh.report_interval 1s to 10m)",
                self.interval_ms
            ));
        }
        if self.requests.len() > MAX_REQUEST_SERIES {
            return bad(format!(
                "requests has {} series; at most {MAX_REQUEST_SERIES}",
                self.requests.len()
            ));
        }
        if self.latency.len() > MAX_LATENCY_SERIES {
            return bad(format!(
                "latency has {} series; at most {MAX_LATENCY_SERIES}",
                self.latency.len()
            ));
        }
        if self.refusals.len() > MAX_REFUSALS {
            return bad(format!(
                "refusals has {} entries; at most {MAX_REFUSALS}",
                self.refusals.len()
            ));
        }
        for r in &self.requests {
            check_labels(&[&r.direction, &r.route, &r.status_class])?;
        }
        for h in &self.latency {
            check_labels(&[&h.direction, &h.route])?;
            h.validate()?;
        }
        for e in &self.refusals {
            check_labels(&[&e.direction, &e.reason, &e.route, &e.method])?;
            if e.at_ms > MAX_AT_MS {
                return bad(format!(
                    "a refusal's at_ms is {}, after the year 9999; it is Unix milliseconds",
                    e.at_ms
                ));
            }
            if e.path.len() > MAX_PATH {
                return bad(format!("a refusal's path is longer than {MAX_PATH} bytes"));
            }
            if e.source.as_ref().is_some_and(|s| s.len() > MAX_LABEL) {
                return bad(format!(
                    "a refusal's source is longer than {MAX_LABEL} bytes"
                ));
            }
        }
        Ok(())
    }
}

impl LatencyHistogram {
    /// Bounds rise, counts match them and never fall, `count` is the last.
    pub fn validate(&self) -> Result<(), ReportError> {
        let name = format!("latency {} {}", self.direction, self.route);
        if self.bounds.len() > MAX_BUCKETS || self.bounds.len() != self.counts.len() {
            return Err(ReportError(format!(
                "{name}: needs one count per bound and at most {MAX_BUCKETS} bounds"
            )));
        }
        let rising = self.bounds.windows(2).all(|w| w[0] < w[1])
            && self.bounds.iter().all(|b| b.is_finite() && *b >= 0.0);
        let cumulative = self.counts.windows(2).all(|w| w[0] <= w[1])
            && self.counts.last().is_none_or(|c| *c <= self.count);
        if !rising || !cumulative || !self.sum.is_finite() {
            return Err(ReportError(format!(
                "{name}: bounds must rise and counts be cumulative (Prometheus buckets)"
            )));
        }
        Ok(())
    }
}

fn check_labels(labels: &[&String]) -> Result<(), ReportError> {
    match labels.iter().find(|l| l.len() > MAX_LABEL) {
        Some(l) => Err(ReportError(format!(
            "label {:?}… is longer than {MAX_LABEL} bytes",
            l.chars().take(32).collect::<String>()
        ))),
        None => Ok(()),
    }
}

/// `path` cut to at most [`MAX_PATH`] bytes on a character boundary.
pub fn clip_path(path: &str) -> String {
    let mut end = path.len().min(MAX_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(bounds: Vec<f64>, counts: Vec<u64>, count: u64) -> LatencyHistogram {
        LatencyHistogram {
            direction: "outbound".into(),
            route: "hello".into(),
            bounds,
            counts,
            count,
            sum: 0.5,
        }
    }

    #[test]
    fn histograms_must_be_cumulative_buckets() {
        let cases = [
            (hist(vec![0.1, 1.0], vec![1, 3], 4), true),
            (hist(vec![], vec![], 0), true),
            (hist(vec![1.0, 0.1], vec![1, 3], 4), false),
            (hist(vec![0.1, 1.0], vec![3, 1], 4), false),
            (hist(vec![0.1, 1.0], vec![1, 5], 4), false),
            (hist(vec![0.1], vec![1, 2], 4), false),
            (hist(vec![f64::NAN], vec![1], 4), false),
        ];
        for (h, ok) in cases {
            assert_eq!(h.validate().is_ok(), ok, "{h:?}");
        }
    }

    #[test]
    fn reports_are_bounded() {
        let ev = RefusalEvent {
            at_ms: 1,
            direction: "inbound".into(),
            status: 403,
            reason: "policy-denied".into(),
            route: "app".into(),
            method: "GET".into(),
            path: "/admin".into(),
            source: None,
        };
        let mut r = TrafficReport {
            instance: "ab12".into(),
            refusals: vec![ev.clone(); MAX_REFUSALS],
            ..Default::default()
        };
        assert!(r.validate().is_ok());
        r.refusals.push(ev.clone());
        let e = r.validate().unwrap_err();
        assert!(e.0.contains("at most 50"), "{e}");
        r.refusals = vec![RefusalEvent {
            route: "x".repeat(MAX_LABEL + 1),
            ..ev
        }];
        assert!(r.validate().is_err());
    }

    #[test]
    fn intervals_and_refusal_times_must_be_sane() {
        let with = |interval_ms, at_ms| TrafficReport {
            instance: "ab12".into(),
            interval_ms,
            refusals: vec![RefusalEvent {
                at_ms,
                direction: "inbound".into(),
                status: 429,
                reason: "rate-limited".into(),
                route: "app".into(),
                method: "GET".into(),
                path: "/".into(),
                source: None,
            }],
            ..Default::default()
        };
        let now = 1_780_000_000_000;
        let cases = [
            (0, now, true),
            (1_000, now, true),
            (600_000, MAX_AT_MS, true),
            (999, now, false),
            (600_001, now, false),
            (u64::MAX, now, false),
            (10_000, MAX_AT_MS + 1, false),
            (10_000, u64::MAX, false),
        ];
        for (interval, at, ok) in cases {
            let got = with(interval, at).validate();
            assert_eq!(got.is_ok(), ok, "{interval} {at}: {got:?}");
        }
        let e = with(u64::MAX, now).validate().unwrap_err();
        assert!(e.0.contains("interval_ms") && e.0.contains("600000"), "{e}");
        let e = with(0, u64::MAX).validate().unwrap_err();
        assert!(e.0.contains("at_ms"), "{e}");
    }

    #[test]
    fn paths_are_clipped_on_a_character_boundary() {
        assert_eq!(clip_path("/a"), "/a");
        let long = "é".repeat(MAX_PATH);
        let c = clip_path(&long);
        assert!(c.len() <= MAX_PATH && c.chars().all(|ch| ch == 'é'));
    }
}
