//! `crankctl slo status`: per capability, each objective's SLI over the
//! window, the error budget left and the current burn rates. The figures
//! come from a Prometheus server (the same error ratios as the recording
//! rules, written out raw so they work whether or not the rules are loaded)
//! or straight from the sidecars' counters ([`from_sidecars`]): the SLI
//! since they started, and the burn rate between two scrapes.
//!
//! A burn rate is the error ratio over a window divided by the budget
//! (1 - target): 1x spends the budget exactly over the SLO's window.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::check::{Measured, Results};
use super::prom::{range, PromError, Prometheus};
use super::rules::{availability_errors, latency_errors, selector, BURN_WINDOWS};
use super::{format_percent, CapabilitySlo, DURATION_BUCKETS};
use crate::tap_cli::{get_metrics, merge, parse_metrics, RouteCounters, Scrape};

/// The largest finite bucket of `crank_request_duration_seconds`.
const TOP_BUCKET: f64 = DURATION_BUCKETS[DURATION_BUCKETS.len() - 1];

/// The windows `--prometheus` reports a burn rate over: the page alerts'.
pub const PROMETHEUS_BURN_WINDOWS: [&str; 4] = ["5m", "30m", "1h", "6h"];

/// One objective in the terms of the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// `availability`, `latency.p99` (as `slo check` names them).
    pub name: String,
    pub target: f64,
    /// The histogram bucket of a latency objective; `None` for availability.
    pub bucket: Option<f64>,
}

/// The objectives of an SLO that the metrics can measure (a latency above
/// the largest bucket cannot be; `slo rules` says so).
pub fn measurable(s: &CapabilitySlo) -> Vec<Objective> {
    let mut out = Vec::new();
    if let Some(a) = s.availability {
        out.push(Objective {
            name: "availability".into(),
            target: a,
            bucket: None,
        });
    }
    for l in &s.latency {
        if let Some(b) = l.bucket {
            out.push(Objective {
                name: format!("latency.{}", l.name),
                target: l.quantile,
                bucket: Some(b),
            });
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `prometheus http://…` or `sidecars 127.0.0.1:4191, …`.
    pub source: String,
    pub capabilities: Vec<CapabilityStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapabilityStatus {
    pub capability: String,
    pub routes: Vec<String>,
    /// `30d`, or `since the sidecars started`.
    pub window: String,
    /// Requests in the window (outbound, on the routes).
    pub requests: Option<f64>,
    pub objectives: Vec<ObjectiveStatus>,
    /// Why nothing is shown, when nothing is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectiveStatus {
    pub objective: String,
    /// Share of good requests the SLO asks for (0.999).
    pub target: f64,
    /// Share of good requests over the window; `None` without requests.
    pub sli: Option<f64>,
    /// Share of the window's error budget not spent (negative: overspent).
    pub budget_left: Option<f64>,
    /// Window (`5m`, or `last 5s`) → error ratio / budget.
    pub burn_rates: BTreeMap<String, Option<f64>>,
    /// The page alert's condition holds: 1h and 5m above 14.4x, or 6h and
    /// 30m above 6x (from the sidecars: the last interval above 14.4x).
    pub page: bool,
    /// The window's budget is spent (`budget_left` at or below 0). A 100%
    /// target has no budget: its first error exhausts it, and its
    /// `budget_left` and burn rates are then infinite, which JSON writes as
    /// `null` (`null` alone means no requests).
    pub exhausted: bool,
}

/// Judges one objective from its error ratio over the window and over each
/// burn window.
pub fn judge(
    o: &Objective,
    window_errors: Option<f64>,
    burns: &[(String, Option<f64>)],
) -> ObjectiveStatus {
    let budget = 1.0 - o.target;
    // No budget (a 100% target) burns infinitely fast on the first error.
    let burn = |e: f64| match (e > 0.0, budget > 0.0) {
        (false, _) => 0.0,
        (true, true) => e / budget,
        (true, false) => f64::INFINITY,
    };
    let burn_rates: BTreeMap<String, Option<f64>> = burns
        .iter()
        .map(|(w, e)| (w.clone(), e.map(burn)))
        .collect();
    let above = |w: &str, rate: f64| {
        burn_rates
            .get(w)
            .copied()
            .flatten()
            .is_some_and(|b| b > rate)
    };
    let pages = BURN_WINDOWS.iter().filter(|b| b.severity == "page");
    let page = if burn_rates.contains_key("5m") {
        pages
            .clone()
            .any(|b| above(b.long, b.rate) && above(b.short, b.rate))
    } else {
        let fastest = pages.map(|b| b.rate).fold(0.0, f64::max);
        burn_rates.values().flatten().any(|b| *b > fastest)
    };
    ObjectiveStatus {
        objective: o.name.clone(),
        target: o.target,
        sli: window_errors.map(|e| 1.0 - e),
        budget_left: window_errors.map(|e| 1.0 - burn(e)),
        burn_rates,
        page,
        exhausted: window_errors.is_some_and(|e| burn(e) >= 1.0),
    }
}

impl Report {
    /// An objective burns at page speed or has spent its budget.
    pub fn burning(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.capabilities {
            for o in &c.objectives {
                if o.page || o.exhausted {
                    out.push(format!("{} {}", c.capability, o.objective));
                }
            }
        }
        out
    }
}

fn without_routes(s: &CapabilitySlo, window: &str) -> CapabilityStatus {
    CapabilityStatus {
        capability: s.capability.clone(),
        routes: Vec::new(),
        window: window.into(),
        requests: None,
        objectives: Vec::new(),
        note: Some(
            "no route has it as its first backend; nothing to measure (add a route for it)".into(),
        ),
    }
}

/// Asks Prometheus for every SLO's figures.
pub fn from_prometheus(slos: &[CapabilitySlo], prom: &Prometheus) -> Result<Report, PromError> {
    let mut caps = Vec::new();
    for s in slos {
        let window = range(s.window);
        if s.routes.is_empty() {
            caps.push(without_routes(s, &window));
            continue;
        }
        let sel = selector(s);
        let errors = |o: &Objective, w: &str| match o.bucket {
            None => availability_errors(&sel, w),
            Some(b) => latency_errors(&sel, b, w),
        };
        let mut objectives = Vec::new();
        for o in measurable(s) {
            let over_window = prom.scalar(&errors(&o, &window))?;
            let mut burns = Vec::new();
            for w in PROMETHEUS_BURN_WINDOWS {
                burns.push((w.to_string(), prom.scalar(&errors(&o, w))?));
            }
            objectives.push(judge(&o, over_window, &burns));
        }
        caps.push(CapabilityStatus {
            capability: s.capability.clone(),
            routes: s.routes.clone(),
            requests: prom.scalar(&format!(
                "sum(increase(crank_requests_total{{{sel}}}[{window}]))"
            ))?,
            window,
            objectives,
            note: None,
        });
    }
    Ok(Report {
        source: format!("prometheus {}", prom.url()),
        capabilities: caps,
    })
}

/// Scrapes the sidecars twice, `interval` apart: the SLI since they
/// started from the second scrape, the burn rate from the difference.
pub fn from_sidecars(
    slos: &[CapabilitySlo],
    addrs: &[SocketAddr],
    interval: Duration,
) -> Result<Report> {
    let scrape_all = || -> Result<Scrape> {
        let mut total = Scrape::new();
        for a in addrs {
            merge(&mut total, parse_metrics(&get_metrics(*a)?));
        }
        Ok(total)
    };
    let before = scrape_all()?;
    let at = Instant::now();
    std::thread::sleep(interval);
    let now = scrape_all()?;
    let last = format!(
        "last {}",
        humantime::format_duration(round_ms(at.elapsed()))
    );
    let window = "since the sidecars started";
    let mut caps = Vec::new();
    for s in slos {
        if s.routes.is_empty() {
            caps.push(without_routes(s, window));
            continue;
        }
        let (b, n) = (totals(&before, &s.routes), totals(&now, &s.routes));
        let delta = difference(&n, &b);
        let objectives = measurable(s)
            .iter()
            .map(|o| {
                judge(
                    o,
                    error_ratio(&n, o.bucket),
                    &[(last.clone(), error_ratio(&delta, o.bucket))],
                )
            })
            .collect();
        caps.push(CapabilityStatus {
            capability: s.capability.clone(),
            routes: s.routes.clone(),
            window: window.into(),
            requests: Some(n.requests),
            objectives,
            note: None,
        });
    }
    let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    Ok(Report {
        source: format!("sidecars {}", names.join(", ")),
        capabilities: caps,
    })
}

/// What a load test's results file would say, measured by Prometheus over
/// the last `over` (`slo check --prometheus`): per capability with a
/// route, the requests, the error rate and each latency objective's
/// percentile (`histogram_quantile`, in ms).
pub fn results_from_prometheus(
    slos: &[CapabilitySlo],
    prom: &Prometheus,
    over: Duration,
) -> Result<Results, PromError> {
    let w = range(over);
    let mut capabilities = BTreeMap::new();
    for s in slos.iter().filter(|s| !s.routes.is_empty()) {
        let sel = selector(s);
        let requests = prom
            .scalar(&format!(
                "sum(increase(crank_requests_total{{{sel}}}[{w}]))"
            ))?
            .unwrap_or(0.0);
        let (mut latency_ms, mut above_buckets) = (BTreeMap::new(), Vec::new());
        for l in &s.latency {
            let q = format!(
                "histogram_quantile({}, sum by (le) (rate(crank_request_duration_seconds_bucket{{{sel}}}[{w}])))",
                l.quantile
            );
            match prom.scalar(&q)?.filter(|v| !v.is_nan()) {
                // In the `+Inf` bucket histogram_quantile answers the
                // largest finite bound: the real value is unknown, above it.
                Some(v) if v >= TOP_BUCKET => above_buckets.push(l.name.clone()),
                Some(v) => {
                    latency_ms.insert(l.name.clone(), v * 1000.0);
                }
                None => {}
            }
        }
        let m = Measured {
            requests: requests.round() as u64,
            error_rate: prom.scalar(&availability_errors(&sel, &w))?,
            latency_ms,
            above_buckets,
        };
        capabilities.insert(s.capability.clone(), m);
    }
    Ok(Results { capabilities })
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

/// The outbound counters of `routes`, summed.
pub fn totals(scrape: &Scrape, routes: &[String]) -> RouteCounters {
    let mut summed = Scrape::new();
    for ((dir, route), c) in scrape {
        if dir == "outbound" && routes.contains(route) {
            merge(&mut summed, Scrape::from([(Default::default(), c.clone())]));
        }
    }
    summed.into_values().next().unwrap_or_default()
}

/// `now - before`, bucket by bucket.
pub fn difference(now: &RouteCounters, before: &RouteCounters) -> RouteCounters {
    RouteCounters {
        requests: now.requests - before.requests,
        failures: now.failures - before.failures,
        buckets: now
            .buckets
            .iter()
            .map(|(le, n)| {
                let prev = before
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |x| x.1);
                (*le, n - prev)
            })
            .collect(),
    }
}

/// Bad requests / requests: failed ones for availability (`bucket` None),
/// ones slower than `bucket` for latency; `None` without requests.
pub fn error_ratio(c: &RouteCounters, bucket: Option<f64>) -> Option<f64> {
    match bucket {
        None => (c.requests > 0.0).then(|| c.failures / c.requests),
        Some(b) => {
            let total = c.buckets.last().map_or(0.0, |x| x.1);
            let fast = c
                .buckets
                .iter()
                .find(|(le, _)| (le - b).abs() < 1e-9)
                .map_or(0.0, |x| x.1);
            (total > 0.0).then(|| 1.0 - fast / total)
        }
    }
}

/// The human table (`wide`: more columns).
pub fn table(r: &Report, wide: bool) -> String {
    let windows = burn_windows(r, wide);
    let mut out = format!("source: {}", r.source);
    for c in &r.capabilities {
        out.push_str(&format!(
            "\n{}: window {}, {} requests",
            c.capability,
            c.window,
            requests(c)
        ));
        if let Some(n) = &c.note {
            out.push_str(&format!(": {n}"));
        }
    }
    out.push_str(&format!(
        "\n\n{:<16} {:<14} {:>8} {:>9} {:>12}",
        "CAPABILITY", "OBJECTIVE", "TARGET", "SLI", "BUDGET LEFT"
    ));
    for w in &windows {
        out.push_str(&format!(" {:>10}", format!("BURN {w}")));
    }
    if wide {
        out.push_str(&format!(" {:>5} {:>10}  ROUTES", "PAGE", "REQUESTS"));
    }
    for c in &r.capabilities {
        for o in &c.objectives {
            out.push_str(&row(c, o, &windows, wide));
        }
    }
    out
}

/// The burn-rate windows any objective has, shortest first (`30m` only
/// when `wide`).
fn burn_windows(r: &Report, wide: bool) -> Vec<String> {
    let mut windows: Vec<String> = r
        .capabilities
        .iter()
        .flat_map(|c| {
            c.objectives
                .iter()
                .flat_map(|o| o.burn_rates.keys().cloned())
        })
        .fold(Vec::new(), |mut acc: Vec<String>, w| {
            if !acc.contains(&w) && (wide || w != "30m") {
                acc.push(w);
            }
            acc
        });
    windows.sort_by_key(|w| humantime::parse_duration(w.trim_start_matches("last ")).ok());
    windows
}

fn requests(c: &CapabilityStatus) -> String {
    c.requests.map_or("-".into(), |n| format!("{n:.0}"))
}

/// One objective's line of the table.
fn row(c: &CapabilityStatus, o: &ObjectiveStatus, windows: &[String], wide: bool) -> String {
    let pct = |v: Option<f64>| match v {
        Some(v) if v.is_infinite() => "exhausted".to_string(),
        v => v.map_or("-".to_string(), format_percent),
    };
    let x = |v: Option<f64>| match v {
        Some(v) if v.is_infinite() => "inf".to_string(),
        v => v.map_or("-".to_string(), |v| format!("{v:.1}x")),
    };
    let mut line = format!(
        "\n{:<16} {:<14} {:>8} {:>9} {:>12}",
        c.capability,
        o.objective,
        format_percent(o.target),
        pct(o.sli),
        pct(o.budget_left.map(|b| (b * 1e4).round() / 1e4)),
    );
    for w in windows {
        line.push_str(&format!(
            " {:>10}",
            x(o.burn_rates.get(w).copied().flatten())
        ));
    }
    if wide {
        let page = if o.page { "yes" } else { "no" };
        line.push_str(&format!(
            " {page:>5} {:>10}  {}",
            requests(c),
            c.routes.join(",")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap_cli::parse_metrics;

    fn availability() -> Objective {
        Objective {
            name: "availability".into(),
            target: 0.999,
            bucket: None,
        }
    }

    fn burns(v: &[(&str, f64)]) -> Vec<(String, Option<f64>)> {
        v.iter().map(|(w, e)| (w.to_string(), Some(*e))).collect()
    }

    #[test]
    fn slo_status_judges_burn_and_budget() {
        // (window error ratio, burn windows' error ratios, page?, budget left)
        type Case<'a> = (f64, Vec<(&'a str, f64)>, bool, f64);
        let cases: Vec<Case> = vec![
            (
                0.0005,
                vec![("5m", 0.0), ("30m", 0.0), ("1h", 0.0), ("6h", 0.0)],
                false,
                0.5,
            ),
            // 10% errors for the last hour: 100x over 5m and 1h.
            (
                0.002,
                vec![("5m", 0.1), ("30m", 0.1), ("1h", 0.1), ("6h", 0.01)],
                true,
                -1.0,
            ),
            // Only the short window burns: no page (the long one says it is a blip).
            (
                0.0001,
                vec![("5m", 0.1), ("30m", 0.0), ("1h", 0.001), ("6h", 0.0)],
                false,
                0.9,
            ),
            // The slow pair: 6h and 30m above 6x.
            (
                0.0001,
                vec![("5m", 0.0), ("30m", 0.007), ("1h", 0.0), ("6h", 0.007)],
                true,
                0.9,
            ),
            // From the sidecars: one interval, above 14.4x.
            (0.0001, vec![("last 5s", 0.02)], true, 0.9),
            (0.0001, vec![("last 5s", 0.01)], false, 0.9),
        ];
        for (i, (w, b, page, left)) in cases.into_iter().enumerate() {
            let s = judge(&availability(), Some(w), &burns(&b));
            assert_eq!(s.page, page, "case {i}: {s:?}");
            assert!(
                (s.budget_left.unwrap() - left).abs() < 1e-9,
                "case {i}: {s:?}"
            );
            assert!((s.sli.unwrap() - (1.0 - w)).abs() < 1e-12);
        }
        let strict = Objective {
            target: 1.0,
            ..availability()
        };
        let s = judge(&strict, Some(0.0), &burns(&[("5m", 0.0)]));
        assert_eq!((s.budget_left, s.burn_rates["5m"]), (Some(1.0), Some(0.0)));
        let none = judge(&availability(), None, &[("5m".into(), None)]);
        assert_eq!((none.sli, none.budget_left, none.page), (None, None, false));
        assert!(!none.exhausted && !s.exhausted);
    }

    /// A Prometheus that answers every query: `quantile` for a
    /// histogram_quantile, 0 for the error ratio, 1000 for anything else.
    fn fake_prometheus(quantile: &'static str) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let (mut req, mut buf) = (Vec::new(), [0u8; 8192]);
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let v = if req.contains("histogram_quantile") {
                    quantile
                } else if req.contains("5xx") {
                    "0" // the error ratio
                } else {
                    "1000"
                };
                let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\n{{\"status\":\"success\",\"data\":{{\"resultType\":\"vector\",\"result\":[{{\"metric\":{{}},\"value\":[1,\"{v}\"]}}]}}}}");
            }
        });
        url
    }

    #[test]
    fn a_quantile_in_the_inf_bucket_is_not_taken_as_its_value() {
        let slo = CapabilitySlo {
            capability: "hello:v1".into(),
            routes: vec!["hello".into()],
            availability: None,
            latency: vec![super::super::LatencyObjective {
                name: "p99".into(),
                quantile: 0.99,
                threshold: Duration::from_secs(120),
                bucket: Some(120.0),
            }],
            window: Duration::from_secs(3600),
        };
        // histogram_quantile answers the top finite bound (300 s) for +Inf.
        let prom = Prometheus::new(&fake_prometheus("300")).unwrap();
        let r =
            results_from_prometheus(std::slice::from_ref(&slo), &prom, Duration::from_secs(300))
                .unwrap();
        let m = &r.capabilities["hello:v1"];
        assert!(m.latency_ms.is_empty(), "{m:?}");
        assert_eq!(m.above_buckets, ["p99"]);
        let v = super::super::check::check(std::slice::from_ref(&slo), &r).unwrap();
        assert_eq!(v[0].status, super::super::check::Status::Broken, "{v:?}");
        assert!(v[0].measured.contains("above the largest bucket"), "{v:?}");
        // Below the top bound: a value.
        let prom = Prometheus::new(&fake_prometheus("2.5")).unwrap();
        let r = results_from_prometheus(&[slo], &prom, Duration::from_secs(300)).unwrap();
        assert_eq!(r.capabilities["hello:v1"].latency_ms["p99"], 2500.0);
    }

    #[test]
    fn a_100_percent_target_with_an_error_says_exhausted() {
        let strict = Objective {
            target: 1.0,
            ..availability()
        };
        let s = judge(&strict, Some(0.001), &burns(&[("5m", 0.01), ("1h", 0.0)]));
        assert!(s.exhausted, "{s:?}");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["exhausted"], true, "{v}");
        assert_eq!(v["burn_rates"]["1h"], 0.0, "{v}");
        let spent = judge(&availability(), Some(0.002), &burns(&[("5m", 0.0)]));
        assert!(spent.exhausted && spent.budget_left.unwrap() < 0.0);
        let r = Report {
            source: "sidecars".into(),
            capabilities: vec![CapabilityStatus {
                capability: "pay:v1".into(),
                routes: vec!["pay".into()],
                window: "30d".into(),
                requests: Some(1000.0),
                objectives: vec![s],
                note: None,
            }],
        };
        let t = table(&r, false);
        assert!(t.contains("exhausted") && t.contains("inf"), "{t}");
        assert_eq!(r.burning(), ["pay:v1 availability"]);
    }

    const METRICS: &str = r#"crank_requests_total{direction="outbound",route="backend",status_class="2xx"} 90
crank_requests_total{direction="outbound",route="backend",status_class="5xx"} 10
crank_requests_total{direction="outbound",route="other",status_class="5xx"} 50
crank_requests_total{direction="inbound",route="backend",status_class="5xx"} 70
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="0.5"} 80
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="+Inf"} 100
"#;

    #[test]
    fn slo_status_from_sidecar_counters() {
        let now = totals(&parse_metrics(METRICS), &["backend".to_string()]);
        assert_eq!((now.requests, now.failures), (100.0, 10.0));
        assert!((error_ratio(&now, None).unwrap() - 0.1).abs() < 1e-12);
        assert!((error_ratio(&now, Some(0.5)).unwrap() - 0.2).abs() < 1e-12);
        let d = difference(&now, &now);
        assert_eq!(
            (error_ratio(&d, None), error_ratio(&d, Some(0.5))),
            (None, None)
        );
        let empty = totals(&parse_metrics(METRICS), &["nope".to_string()]);
        assert_eq!(error_ratio(&empty, None), None);
    }

    #[test]
    fn slo_status_table_shows_each_objective() {
        let o = judge(
            &availability(),
            Some(0.1),
            &burns(&[("5m", 0.1), ("30m", 0.1), ("1h", 0.1), ("6h", 0.1)]),
        );
        let r = Report {
            source: "prometheus http://p:9090".into(),
            capabilities: vec![CapabilityStatus {
                capability: "transcode:v1".into(),
                routes: vec!["transcode".into()],
                window: "30d".into(),
                requests: Some(1000.0),
                objectives: vec![o],
                note: None,
            }],
        };
        let t = table(&r, false);
        assert!(t.contains("BURN 5m") && !t.contains("BURN 30m"), "{t}");
        assert!(t.contains("transcode:v1: window 30d, 1000 requests"), "{t}");
        assert!(
            t.contains("90%") && t.contains("-9900%") && t.contains("100.0x"),
            "{t}"
        );
        let w = table(&r, true);
        assert!(
            w.contains("BURN 30m") && w.contains("yes") && w.contains("transcode"),
            "{w}"
        );
        assert_eq!(r.burning(), ["transcode:v1 availability"]);
    }
}
