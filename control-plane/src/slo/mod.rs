//! SLOs from the mesh config directory (`slo/*.yaml`), turned into what
//! can be measured: [`objectives`] maps each SLO to the routes whose
//! metrics carry its capability, its availability target and one latency
//! objective per percentile with the histogram bucket that measures it.
//! [`rules`] writes Prometheus recording and burn-rate alert rules from
//! them; [`check`] compares a load test's results with them (a CI gate).

pub mod check;
pub mod prom;
pub mod rules;
pub mod status;

use std::time::Duration;

use crank_api::mesh::{MeshRoute, SloFile};
use serde::Serialize;

use crate::configdir::{percent, MeshSnapshot};

/// The upper bounds of `crank_request_duration_seconds`, in seconds; the
/// same list as `proxy/src/metrics/mod.rs` (a test below reads that file).
pub const DURATION_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Without `measurement_window` an SLO is measured over 30 days, the window
/// the SRE workbook's burn rates are made for.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// One capability's SLO, in the terms of the proxy's metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapabilitySlo {
    pub capability: String,
    /// The routes whose capability (their first backend's) is this one:
    /// `crank_requests_total` carries the route, not the capability.
    pub routes: Vec<String>,
    /// Share of requests that must succeed, 0..1 (`99.9%` → 0.999).
    pub availability: Option<f64>,
    pub latency: Vec<LatencyObjective>,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// "`quantile` of the requests take at most `threshold`".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyObjective {
    /// `p95`.
    pub name: String,
    /// 0.95.
    pub quantile: f64,
    #[serde(with = "humantime_serde")]
    pub threshold: Duration,
    /// The smallest bucket bound at or above the threshold (seconds);
    /// `None` when the threshold is above the largest finite bucket, so the
    /// metrics cannot tell a slow request from a fast one.
    pub bucket: Option<f64>,
}

impl LatencyObjective {
    /// True when the bucket is exactly the threshold.
    pub fn exact(&self) -> bool {
        self.bucket == Some(self.threshold.as_secs_f64())
    }
}

/// The smallest bucket bound at or above `threshold`.
pub fn nearest_bucket(threshold: Duration) -> Option<f64> {
    let t = threshold.as_secs_f64();
    // A bound within a nanosecond of the threshold is the threshold.
    DURATION_BUCKETS.iter().copied().find(|b| *b >= t - 1e-9)
}

/// Every SLO of a valid directory, with its routes.
pub fn objectives(snapshot: &MeshSnapshot) -> Vec<CapabilitySlo> {
    let mut out: Vec<CapabilitySlo> = snapshot
        .slos
        .iter()
        .map(|s| objective(s, &snapshot.routes))
        .collect();
    out.sort_by(|a, b| a.capability.cmp(&b.capability));
    out
}

fn objective(s: &SloFile, routes: &[MeshRoute]) -> CapabilitySlo {
    let availability = match (&s.slo.availability, &s.slo.error_budget) {
        (Some(a), _) => percent(a),
        (None, Some(b)) => percent(b).map(|b| 100.0 - b),
        (None, None) => None,
    }
    // Rounded: 99.9 / 100 is 0.9990000000000001 in floating point.
    .map(|p| (p / 100.0 * 1e12).round() / 1e12);
    let mut latency = Vec::new();
    if let Some(l) = &s.slo.latency {
        for (name, quantile, d) in [
            ("p50", 0.5, l.p50),
            ("p95", 0.95, l.p95),
            ("p99", 0.99, l.p99),
        ] {
            if let Some(threshold) = d {
                latency.push(LatencyObjective {
                    name: name.into(),
                    quantile,
                    threshold,
                    bucket: nearest_bucket(threshold),
                });
            }
        }
    }
    CapabilitySlo {
        capability: s.capability.clone(),
        routes: routes
            .iter()
            .filter(|r| r.backends.first().map(|b| &b.capability) == Some(&s.capability))
            .map(|r| r.name.clone())
            .collect(),
        availability,
        latency,
        window: s.slo.measurement_window.unwrap_or(DEFAULT_WINDOW),
    }
}

/// `0.999` → `99.9%`.
pub fn format_percent(ratio: f64) -> String {
    let s = format!("{:.4}", ratio * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_proxys() {
        let src = include_str!("../../../proxy/src/metrics/mod.rs");
        let start = src
            .find("\"crank_request_duration_seconds\"")
            .expect("the histogram in proxy/src/metrics/mod.rs");
        let rest = &src[start..];
        let list = &rest[rest.find(".buckets(vec![").unwrap() + 14..];
        let list = &list[..list.find(']').unwrap()];
        let proxy: Vec<f64> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(proxy, DURATION_BUCKETS.to_vec());
    }

    #[test]
    fn slo_nearest_bucket_at_or_above() {
        let ms = Duration::from_millis;
        for (threshold, want) in [
            (ms(5000), Some(5.0)),
            (ms(30_000), Some(30.0)),
            (ms(300), Some(0.5)),
            (ms(1), Some(0.001)),
            (Duration::from_micros(100), Some(0.0005)),
            (ms(30_001), Some(60.0)),
            (ms(120_000), Some(120.0)),
            (ms(300_000), Some(300.0)),
            (ms(300_001), None),
        ] {
            assert_eq!(nearest_bucket(threshold), want, "{threshold:?}");
        }
    }

    #[test]
    fn slo_objectives_of_the_example_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mesh-config");
        let snap = crate::configdir::load(std::path::Path::new(dir)).unwrap();
        let o = objectives(&snap);
        assert_eq!(o.len(), 1);
        let t = &o[0];
        assert_eq!(t.capability, "transcode:v1");
        assert_eq!(t.routes, ["transcode"]);
        assert_eq!(t.availability, Some(0.999));
        assert_eq!(t.window, DEFAULT_WINDOW);
        let names: Vec<_> = t
            .latency
            .iter()
            .map(|l| (l.name.as_str(), l.bucket))
            .collect();
        assert_eq!(
            names,
            [
                ("p50", Some(5.0)),
                ("p95", Some(30.0)),
                ("p99", Some(120.0))
            ]
        );
    }

    #[test]
    fn slo_percent_formatting() {
        for (r, s) in [
            (0.999, "99.9%"),
            (0.5, "50%"),
            (0.0001, "0.01%"),
            (1.0, "100%"),
        ] {
            assert_eq!(format_percent(r), s);
        }
    }
}
