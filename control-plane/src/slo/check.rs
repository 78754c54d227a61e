//! `crankctl slo check`: measured results of a load test (per capability:
//! latency percentiles, error rate, request count) against the SLOs, for a
//! service team's CI. [`check`] is pure; a missing percentile is bounded
//! by its measured neighbours (p90 above the p95 threshold breaks it, p99
//! within it meets it) and is only "not measured" when they cannot tell.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{format_percent, CapabilitySlo, DURATION_BUCKETS};

/// The `--results` file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Results {
    /// Capability → what was measured.
    pub capabilities: BTreeMap<String, Measured>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// Requests the figures come from.
    pub requests: u64,
    /// Failed requests / requests, 0 to 1.
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Percentile (`p50`, `p90`, `p95`, `p99`, `p99.9`) → milliseconds.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, f64>,
    /// Percentiles that Prometheus puts in the `+Inf` bucket: above the
    /// largest finite bucket, so their value is unknown (not in a results
    /// file; `slo check --prometheus` fills it).
    #[serde(skip)]
    pub above_buckets: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Met,
    Broken,
    NotMeasured,
}

/// One objective of one capability, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub capability: String,
    /// `availability`, `latency.p95`.
    pub objective: String,
    /// `error rate <= 0.1%`, `p95 <= 30s`.
    pub target: String,
    /// What the results say, or why they say nothing.
    pub measured: String,
    pub status: Status,
    /// How far past the objective, when broken (`+0.4 points (5x the budget)`, `+12s (40%)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_by: Option<String>,
}

/// Why the results cannot be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("capability {0} in the results has no SLO in the directory (a typo? SLOs: {1})")]
    UnknownCapability(String, String),
    #[error("the results name no capability that has an SLO; expected one of: {0}")]
    Nothing(String),
    #[error("{0}: {1}")]
    Invalid(String, String),
}

/// Every objective of every capability in the results.
pub fn check(slos: &[CapabilitySlo], results: &Results) -> Result<Vec<Verdict>, CheckError> {
    let names = || {
        slos.iter()
            .map(|s| s.capability.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if results.capabilities.is_empty() {
        return Err(CheckError::Nothing(names()));
    }
    let mut out = Vec::new();
    for (cap, m) in &results.capabilities {
        let slo = slos
            .iter()
            .find(|s| &s.capability == cap)
            .ok_or_else(|| CheckError::UnknownCapability(cap.clone(), names()))?;
        validate(cap, m)?;
        out.extend(check_one(slo, m));
    }
    Ok(out)
}

fn validate(cap: &str, m: &Measured) -> Result<(), CheckError> {
    let bad = |msg: String| Err(CheckError::Invalid(cap.to_string(), msg));
    if let Some(e) = m.error_rate {
        if !(0.0..=1.0).contains(&e) {
            return bad(format!(
                "error_rate {e} is not a fraction from 0 to 1 (0.002 for 0.2%)"
            ));
        }
    }
    for (k, v) in &m.latency_ms {
        if quantile(k).is_none() {
            return bad(format!(
                "latency_ms.{k}: not a percentile; use p50, p90, p95, p99 or p99.9"
            ));
        }
        if !v.is_finite() || *v < 0.0 {
            return bad(format!(
                "latency_ms.{k}: {v} is not a number of milliseconds"
            ));
        }
    }
    Ok(())
}

/// `p95` → 0.95, `p99.9` → 0.999.
fn quantile(name: &str) -> Option<f64> {
    let v: f64 = name.strip_prefix('p')?.parse().ok()?;
    (v > 0.0 && v < 100.0).then_some(v / 100.0)
}

fn check_one(slo: &CapabilitySlo, m: &Measured) -> Vec<Verdict> {
    let verdict = |objective: String, target: String| Verdict {
        capability: slo.capability.clone(),
        objective,
        target,
        measured: String::new(),
        status: Status::NotMeasured,
        over_by: None,
    };
    let mut out = Vec::new();
    if m.requests == 0 {
        let mut v = verdict("requests".into(), "at least 1".into());
        v.measured = "0 requests: nothing was measured".into();
        out.push(v);
        return out;
    }
    if let Some(a) = slo.availability {
        let budget = 1.0 - a;
        let v = verdict(
            "availability".into(),
            format!("error rate <= {}", format_percent(budget)),
        );
        out.push(availability(v, budget, m));
    }
    for l in &slo.latency {
        let mut v = verdict(
            format!("latency.{}", l.name),
            format!("{} <= {}", l.name, humantime::format_duration(l.threshold)),
        );
        let limit = l.threshold.as_secs_f64() * 1000.0;
        if m.above_buckets.contains(&l.name) {
            out.push(above_buckets(v, limit));
            continue;
        }
        let (status, measured) = latency(l.quantile, limit, &m.latency_ms);
        v.status = status;
        v.measured = measured.0;
        if status == Status::Broken {
            let over = measured.1 - limit;
            v.over_by = Some(format!("+{} ({:.0}% over)", ms(over), over / limit * 100.0));
        }
        out.push(v);
    }
    out
}

/// The availability verdict: the measured error rate against the budget.
fn availability(mut v: Verdict, budget: f64, m: &Measured) -> Verdict {
    let Some(e) = m.error_rate else {
        v.measured = "no error_rate in the results".into();
        return v;
    };
    v.measured = format!(
        "error rate {} of {} requests",
        format_percent(e),
        m.requests
    );
    if e > budget + 1e-12 {
        v.status = Status::Broken;
        v.over_by = Some(format!(
            "+{} points ({:.1}x the budget)",
            format_percent(e - budget).trim_end_matches('%'),
            if budget > 0.0 {
                e / budget
            } else {
                f64::INFINITY
            }
        ));
    } else {
        v.status = Status::Met;
    }
    v
}

/// A percentile above the largest bucket: slower than any bucket shows,
/// so broken when the limit is within the buckets, else not measured.
fn above_buckets(mut v: Verdict, limit: f64) -> Verdict {
    let top = DURATION_BUCKETS[DURATION_BUCKETS.len() - 1] * 1000.0;
    let name = v.objective.trim_start_matches("latency.").to_string();
    v.measured = format!(
        "{name} above the largest bucket ({}): the latency is too high for the histogram to measure",
        ms(top)
    );
    if limit <= top {
        v.status = Status::Broken;
        v.over_by = (top > limit).then(|| format!("more than +{}", ms(top - limit)));
    } else {
        v.status = Status::NotMeasured;
    }
    v
}

/// Judges "quantile q within `limit` ms" from the measured percentiles:
/// the same percentile decides; else a higher one within the limit meets
/// it, a lower one above the limit breaks it.
fn latency(q: f64, limit: f64, measured: &BTreeMap<String, f64>) -> (Status, (String, f64)) {
    let mut pts: Vec<(f64, &str, f64)> = measured
        .iter()
        .filter_map(|(k, v)| Some((quantile(k)?, k.as_str(), *v)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let say = |name: &str, v: f64, how: &str| format!("{name} {}{how}", ms(v));
    if let Some((_, name, v)) = pts.iter().find(|p| (p.0 - q).abs() < 1e-9) {
        let s = if *v > limit {
            Status::Broken
        } else {
            Status::Met
        };
        return (s, (say(name, *v, ""), *v));
    }
    if let Some((_, name, v)) = pts.iter().rev().find(|p| p.0 < q && p.2 > limit) {
        return (
            Status::Broken,
            (say(name, *v, ", so higher percentiles are too"), *v),
        );
    }
    if let Some((_, name, v)) = pts.iter().find(|p| p.0 > q && p.2 <= limit) {
        return (
            Status::Met,
            (say(name, *v, ", so lower percentiles are too"), *v),
        );
    }
    let have: Vec<&str> = pts.iter().map(|p| p.1).collect();
    let msg = if have.is_empty() {
        "no latency_ms in the results".to_string()
    } else {
        format!(
            "not measured (results have {}, which cannot tell)",
            have.join(", ")
        )
    };
    (Status::NotMeasured, (msg, 0.0))
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        humantime::format_duration(Duration::from_millis(v.round() as u64)).to_string()
    } else {
        format!("{}ms", (v * 10.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::{nearest_bucket, LatencyObjective, DEFAULT_WINDOW};

    fn transcode() -> CapabilitySlo {
        let lat = |name: &str, quantile, secs| LatencyObjective {
            name: name.into(),
            quantile,
            threshold: Duration::from_secs(secs),
            bucket: nearest_bucket(Duration::from_secs(secs)),
        };
        CapabilitySlo {
            capability: "transcode:v1".into(),
            routes: vec!["transcode".into()],
            availability: Some(0.999),
            latency: vec![
                lat("p50", 0.5, 5),
                lat("p95", 0.95, 30),
                lat("p99", 0.99, 120),
            ],
            window: DEFAULT_WINDOW,
        }
    }

    fn measured(error_rate: Option<f64>, lat: &[(&str, f64)]) -> Results {
        Results {
            capabilities: BTreeMap::from([(
                "transcode:v1".to_string(),
                Measured {
                    requests: 1000,
                    error_rate,
                    latency_ms: lat.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    above_buckets: Vec::new(),
                },
            )]),
        }
    }

    fn statuses(v: &[Verdict]) -> Vec<(&str, Status)> {
        v.iter().map(|v| (v.objective.as_str(), v.status)).collect()
    }

    use Status::*;

    #[test]
    fn a_percentile_above_the_largest_bucket_is_broken_not_met() {
        // histogram_quantile says 300000 ms (the top bound) for a p99 in
        // `+Inf`; slo check --prometheus marks it instead of taking it.
        let mut r = measured(Some(0.0), &[("p50", 100.0), ("p95", 200.0)]);
        let m = r.capabilities.get_mut("transcode:v1").unwrap();
        m.above_buckets.push("p99".into());
        let v = check(&[transcode()], &r).unwrap();
        let p99 = v.iter().find(|v| v.objective == "latency.p99").unwrap();
        assert_eq!(p99.status, Broken, "{p99:?}");
        assert!(
            p99.measured.contains("p99 above the largest bucket (5m)"),
            "{p99:?}"
        );
        assert!(
            p99.over_by
                .as_deref()
                .is_some_and(|o| o.contains("more than +3m")),
            "{p99:?}"
        );
        // A threshold above the buckets: unknown either way.
        let mut beyond = transcode();
        beyond.latency[2].threshold = Duration::from_secs(600);
        beyond.latency[2].bucket = None;
        let v = check(&[beyond], &r).unwrap();
        let p99 = v.iter().find(|v| v.objective == "latency.p99").unwrap();
        assert_eq!(p99.status, NotMeasured, "{p99:?}");
    }

    #[test]
    fn slo_check_table() {
        let full = [("p50", 3000.0), ("p95", 20_000.0), ("p99", 90_000.0)];
        let cases: Vec<(&str, Results, [Status; 4])> = vec![
            (
                "all met",
                measured(Some(0.0005), &full),
                [Met, Met, Met, Met],
            ),
            (
                "at the budget exactly",
                measured(Some(0.001), &full),
                [Met, Met, Met, Met],
            ),
            (
                "errors over budget",
                measured(Some(0.005), &full),
                [Broken, Met, Met, Met],
            ),
            (
                "p99 over",
                measured(
                    Some(0.0),
                    &[("p50", 3000.0), ("p95", 20_000.0), ("p99", 150_000.0)],
                ),
                [Met, Met, Met, Broken],
            ),
            (
                "p90 above the p95 threshold breaks p95",
                measured(
                    Some(0.0),
                    &[("p50", 3000.0), ("p90", 31_000.0), ("p99", 100_000.0)],
                ),
                [Met, Met, Broken, Met],
            ),
            (
                "p99 within the p95 threshold meets p95",
                measured(
                    Some(0.0),
                    &[("p50", 3000.0), ("p90", 9000.0), ("p99", 25_000.0)],
                ),
                [Met, Met, Met, Met],
            ),
            (
                "p90 and p99 cannot tell p95",
                measured(
                    Some(0.0),
                    &[("p50", 3000.0), ("p90", 9000.0), ("p99", 60_000.0)],
                ),
                [Met, Met, NotMeasured, Met],
            ),
            ("nothing measured", measured(None, &[]), [NotMeasured; 4]),
        ];
        for (name, results, want) in cases {
            let v = check(&[transcode()], &results).unwrap();
            let got: Vec<Status> = v.iter().map(|v| v.status).collect();
            assert_eq!(got, want, "{name}: {v:#?}");
        }
    }

    #[test]
    fn slo_check_says_by_how_much() {
        let v = check(
            &[transcode()],
            &measured(Some(0.005), &[("p50", 6000.0), ("p95", 1.0), ("p99", 1.0)]),
        )
        .unwrap();
        assert_eq!(
            statuses(&v)[..2],
            [("availability", Broken), ("latency.p50", Broken)]
        );
        assert_eq!(
            v[0].over_by.as_deref(),
            Some("+0.4 points (5.0x the budget)")
        );
        assert_eq!(v[0].measured, "error rate 0.5% of 1000 requests");
        assert_eq!(v[1].over_by.as_deref(), Some("+1s (20% over)"));
        assert_eq!(v[1].target, "p50 <= 5s");
    }

    #[test]
    fn slo_check_refuses_bad_results() {
        let mut r = measured(Some(0.0), &[]);
        r.capabilities
            .insert("transcod:v1".into(), Measured::default());
        assert!(matches!(
            check(&[transcode()], &r),
            Err(CheckError::UnknownCapability(c, _)) if c == "transcod:v1"
        ));
        let r = measured(Some(2.0), &[]);
        assert!(matches!(
            check(&[transcode()], &r),
            Err(CheckError::Invalid(..))
        ));
        let r = measured(Some(0.0), &[("median", 1.0)]);
        assert!(matches!(
            check(&[transcode()], &r),
            Err(CheckError::Invalid(..))
        ));
        let r = Results {
            capabilities: BTreeMap::new(),
        };
        assert!(matches!(
            check(&[transcode()], &r),
            Err(CheckError::Nothing(_))
        ));
    }

    #[test]
    fn slo_check_zero_requests_is_not_a_pass() {
        let mut r = measured(Some(0.0), &[("p50", 1.0)]);
        r.capabilities.get_mut("transcode:v1").unwrap().requests = 0;
        let v = check(&[transcode()], &r).unwrap();
        assert_eq!(statuses(&v), [("requests", NotMeasured)]);
    }
}
