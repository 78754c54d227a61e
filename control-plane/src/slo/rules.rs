//! Prometheus rules for the SLOs (`crankctl slo rules`): per capability one
//! rule group with the error ratio of each objective over every window the
//! alerts need (recording rules), then multiwindow, multi-burn-rate alerts
//! after the SRE workbook ("Alerting on SLOs", table of recommended
//! parameters): page when 1h and 5m burn faster than 14.4x or 6h and 30m
//! faster than 6x; ticket when 1d and 2h burn faster than 3x or 3d and 6h
//! faster than 1x.
//!
//! The proxy's metrics carry the route, not the capability, so an SLO is
//! measured on the outbound requests of the routes whose first backend is
//! its capability (the route's capability, as for quotas). A latency
//! objective uses the nearest `crank_request_duration_seconds` bucket at
//! or above its threshold; the output says so in a comment when that is
//! not the threshold itself.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{format_percent, CapabilitySlo, LatencyObjective, DURATION_BUCKETS};

/// One row of the workbook's table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurnWindow {
    pub severity: &'static str,
    pub long: &'static str,
    pub short: &'static str,
    pub long_hours: f64,
    pub rate: f64,
}

/// The SRE workbook's multiwindow, multi-burn-rate parameters.
pub const BURN_WINDOWS: [BurnWindow; 4] = [
    BurnWindow {
        severity: "page",
        long: "1h",
        short: "5m",
        long_hours: 1.0,
        rate: 14.4,
    },
    BurnWindow {
        severity: "page",
        long: "6h",
        short: "30m",
        long_hours: 6.0,
        rate: 6.0,
    },
    BurnWindow {
        severity: "ticket",
        long: "1d",
        short: "2h",
        long_hours: 24.0,
        rate: 3.0,
    },
    BurnWindow {
        severity: "ticket",
        long: "3d",
        short: "6h",
        long_hours: 72.0,
        rate: 1.0,
    },
];

/// Every window a recording rule is made for.
pub const WINDOWS: [&str; 7] = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"];

/// The recorded error ratio (bad requests / all requests) over a window.
pub fn record_name(window: &str) -> String {
    format!("crank:slo_errors:ratio_rate{window}")
}

pub const ALERT_NAME: &str = "CrankSLOErrorBudgetBurn";

/// The rules file, and what it says about objectives it could not measure
/// exactly (also written in it as comments).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleFile {
    pub yaml: String,
    pub recording_rules: usize,
    pub alerts: usize,
    pub notes: Vec<String>,
}

#[derive(Serialize)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Serialize)]
struct Rule {
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<String>,
    expr: String,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// What one objective measures: its `slo` label, its target ratio and the
/// PromQL of its error ratio over a window.
struct Measured {
    slo: String,
    what: String,
    target: f64,
    errors: Box<dyn Fn(&str) -> String>,
}

/// The rules for every SLO. `source` names the directory in the header.
pub fn generate(slos: &[CapabilitySlo], source: &str) -> RuleFile {
    let mut out = RuleFile {
        yaml: header(source),
        recording_rules: 0,
        alerts: 0,
        notes: Vec::new(),
    };
    if slos.is_empty() {
        out.yaml.push_str("groups: []\n");
        return out;
    }
    out.yaml.push_str("groups:\n");
    for s in slos {
        let (group, notes) = group(s);
        for n in &notes {
            out.yaml.push_str(&format!("  # {n}\n"));
        }
        out.notes.extend(notes);
        let Some(group) = group else { continue };
        out.recording_rules += group.rules.iter().filter(|r| r.record.is_some()).count();
        out.alerts += group.rules.iter().filter(|r| r.alert.is_some()).count();
        let text = serde_yaml::to_string(&vec![group]).expect("rules serialize");
        for line in text.lines() {
            out.yaml.push_str(&format!("  {line}\n"));
        }
    }
    out
}

fn header(source: &str) -> String {
    format!(
        "# Prometheus rules for the SLOs in {source}, made by `crankctl slo rules`;\n\
         # change slo/*.yaml and run it again rather than editing this file.\n\
         # {record}{{capability, slo}}: share of bad requests over W (slo=availability:\n\
         # 5xx or no response; slo=latency-pNN: slower than the objective's bucket),\n\
         # outbound, on the routes whose first backend is the capability.\n\
         # {ALERT_NAME}: the SRE workbook's multiwindow, multi-burn-rate alerts:\n\
         # page: 1h and 5m above 14.4x the budget, or 6h and 30m above 6x;\n\
         # ticket: 1d and 2h above 3x, or 3d and 6h above 1x.\n",
        record = record_name("W"),
    )
}

fn group(s: &CapabilitySlo) -> (Option<Group>, Vec<String>) {
    let cap = &s.capability;
    let mut notes = Vec::new();
    if s.routes.is_empty() {
        notes.push(format!(
            "{cap}: no route has it as its first backend, and crank_requests_total carries only the route; nothing to measure, no rules (add a route for it)"
        ));
        return (None, notes);
    }
    let measured = objectives(s, &mut notes);
    let mut rules = Vec::new();
    for m in &measured {
        for w in WINDOWS {
            rules.push(Rule {
                record: Some(record_name(w)),
                alert: None,
                expr: (m.errors)(w),
                labels: labels(cap, &m.slo, None),
                annotations: BTreeMap::new(),
            });
        }
    }
    for m in &measured {
        for severity in ["page", "ticket"] {
            if let Some(rule) = alert(s, m, severity, &mut notes) {
                rules.push(rule);
            }
        }
    }
    let group = Group {
        name: format!("crank-slo/{cap}"),
        rules,
    };
    (Some(group), notes)
}

/// What an SLO measures: availability, then each latency objective the
/// buckets can tell (a note for those they cannot, or only roughly).
fn objectives(s: &CapabilitySlo, notes: &mut Vec<String>) -> Vec<Measured> {
    let cap = &s.capability;
    let sel = selector(s);
    let mut measured = Vec::new();
    if let Some(a) = s.availability {
        let sel = sel.clone();
        measured.push(Measured {
            slo: "availability".into(),
            what: format!("availability {}", format_percent(a)),
            target: a,
            errors: Box::new(move |w| availability_errors(&sel, w)),
        });
    }
    for l in &s.latency {
        let Some(bucket) = l.bucket else {
            notes.push(format!(
                "{cap}: latency {} {}: above the largest crank_request_duration_seconds bucket ({}), so the metrics cannot tell slower requests from faster ones; no rules for it",
                l.name,
                humantime::format_duration(l.threshold),
                humantime::format_duration(std::time::Duration::from_secs_f64(
                    DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]
                )),
            ));
            continue;
        };
        if !l.exact() {
            notes.push(inexact_note(cap, l, bucket));
        }
        let sel = sel.clone();
        measured.push(Measured {
            slo: format!("latency-{}", l.name),
            what: format!(
                "latency {}: {} of requests within {}",
                l.name,
                format_percent(l.quantile),
                humantime::format_duration(l.threshold)
            ),
            target: l.quantile,
            errors: Box::new(move |w| latency_errors(&sel, bucket, w)),
        });
    }
    measured
}

/// The series selector of an SLO's requests: outbound, on the routes
/// whose first backend is its capability.
pub fn selector(s: &CapabilitySlo) -> String {
    format!(
        "direction=\"outbound\",route=~\"{}\"",
        promql_string(
            &s.routes
                .iter()
                .map(|r| regex_escape(r))
                .collect::<Vec<_>>()
                .join("|")
        )
    )
}

/// PromQL: the share of requests matching `sel` that failed (5xx or no
/// response) over the range `w`.
pub fn availability_errors(sel: &str, w: &str) -> String {
    format!(
        "(sum(rate(crank_requests_total{{{sel},status_class=~\"5xx|error\"}}[{w}])) or vector(0))\n/\nsum(rate(crank_requests_total{{{sel}}}[{w}]))"
    )
}

/// PromQL: the share of requests matching `sel` slower than the bucket
/// `le` (seconds) over the range `w`.
pub fn latency_errors(sel: &str, le: f64, w: &str) -> String {
    let le = le_matcher(le);
    format!(
        "1 - (\nsum(rate(crank_request_duration_seconds_bucket{{{sel},{le}}}[{w}]))\n/\nsum(rate(crank_request_duration_seconds_count{{{sel}}}[{w}]))\n)"
    )
}

/// The label matcher of the bucket `le` (seconds), in both forms a
/// Prometheus stores it: `le="120"` (2.x) and `le="120.0"` (3.x normalizes
/// whole numbers to float form on ingestion), so `le=~"120(\\.0)?"`.
pub fn le_matcher(le: f64) -> String {
    let text = le.to_string();
    let whole = if text.contains('.') { "" } else { "(\\\\.0)?" };
    format!("le=~\"{}{whole}\"", text.replace('.', "\\\\."))
}

fn inexact_note(cap: &str, l: &LatencyObjective, bucket: f64) -> String {
    format!(
        "{cap}: latency {} {} is not a bucket boundary; measured with le=\"{bucket}\", the nearest bucket above it, so requests up to {} count as fast",
        l.name,
        humantime::format_duration(l.threshold),
        humantime::format_duration(std::time::Duration::from_secs_f64(bucket)),
    )
}

fn labels(cap: &str, slo: &str, severity: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("capability".to_string(), cap.to_string()),
        ("slo".to_string(), slo.to_string()),
    ]);
    if let Some(s) = severity {
        l.insert("severity".into(), s.into());
    }
    l
}

/// The alert of one severity: each of its window pairs whose threshold an
/// error ratio can reach (at most 100%), joined with `or`.
fn alert(s: &CapabilitySlo, m: &Measured, severity: &str, notes: &mut Vec<String>) -> Option<Rule> {
    let budget = 1.0 - m.target;
    let matcher = format!(
        "{{capability=\"{}\",slo=\"{}\"}}",
        promql_string(&s.capability),
        m.slo
    );
    let mut parts = Vec::new();
    let mut described = Vec::new();
    for b in BURN_WINDOWS.iter().filter(|b| b.severity == severity) {
        if b.rate * budget >= 1.0 {
            notes.push(format!(
                "{}: {}: a {}x burn over {} needs more than {} of requests bad, which cannot happen; that {} alert is left out",
                s.capability,
                m.what,
                num(b.rate),
                b.long,
                format_percent(b.rate * budget),
                severity
            ));
            continue;
        }
        let threshold = format!("({} * {})", num(b.rate), num(budget));
        parts.push(format!(
            "(\n  {long}{matcher} > {threshold}\nand\n  {short}{matcher} > {threshold}\n)",
            long = record_name(b.long),
            short = record_name(b.short),
        ));
        let consumed = b.rate * b.long_hours * 3600.0 / s.window.as_secs_f64();
        described.push(format!(
            "{}x the budget over {} and {} ({} of the {} budget in {})",
            num(b.rate),
            b.long,
            b.short,
            format_percent(consumed),
            humantime::format_duration(s.window),
            b.long
        ));
    }
    if parts.is_empty() {
        return None;
    }
    let annotations = annotations(s, m, budget, &described);
    Some(Rule {
        record: None,
        alert: Some(ALERT_NAME.into()),
        expr: parts.join("\nor\n"),
        labels: labels(&s.capability, &m.slo, Some(severity)),
        annotations,
    })
}

/// The alert's summary and description: what burns, how fast, where.
fn annotations(
    s: &CapabilitySlo,
    m: &Measured,
    budget: f64,
    described: &[String],
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "summary".to_string(),
            format!(
                "{} burns its {} error budget too fast",
                s.capability, m.slo
            ),
        ),
        (
            "description".to_string(),
            format!(
                "{} {} (budget {} over {}): burning faster than {}, on routes {}. See docs/guides/platform-engineer.md#slos-rules-and-the-ci-gate",
                s.capability,
                m.what,
                format_percent(budget),
                humantime::format_duration(s.window),
                described.join(", or "),
                s.routes.join(", "),
            ),
        ),
    ])
}

/// A number without float noise: `0.0010000000000000009` → `0.001`.
fn num(v: f64) -> String {
    let s = format!("{v:.10}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The contents of a double-quoted PromQL string.
fn promql_string(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::slo::{nearest_bucket, DEFAULT_WINDOW};

    fn slo(availability: Option<f64>, latency: &[(&str, f64, u64)]) -> CapabilitySlo {
        CapabilitySlo {
            capability: "transcode:v1".into(),
            routes: vec!["transcode".into(), "tc.v2".into()],
            availability,
            latency: latency
                .iter()
                .map(|(n, q, ms)| LatencyObjective {
                    name: n.to_string(),
                    quantile: *q,
                    threshold: Duration::from_millis(*ms),
                    bucket: nearest_bucket(Duration::from_millis(*ms)),
                })
                .collect(),
            window: DEFAULT_WINDOW,
        }
    }

    fn parse(f: &RuleFile) -> serde_yaml::Value {
        serde_yaml::from_str(&f.yaml).expect("valid YAML")
    }

    #[test]
    fn slo_rules_availability_has_seven_records_and_two_alerts() {
        let f = generate(&[slo(Some(0.999), &[])], "mc");
        assert_eq!((f.recording_rules, f.alerts), (7, 2));
        assert!(f.notes.is_empty(), "{:?}", f.notes);
        let v = parse(&f);
        let rules = &v["groups"][0]["rules"];
        assert_eq!(v["groups"][0]["name"], "crank-slo/transcode:v1");
        let expr = rules[0]["expr"].as_str().unwrap();
        assert!(
            expr.contains(r#"route=~"transcode|tc\\.v2""#),
            "route names are regex-escaped: {expr}"
        );
        assert!(expr.contains("status_class=~\"5xx|error\""), "{expr}");
        let page = rules[7]["expr"].as_str().unwrap();
        assert!(
            page.contains(
                "ratio_rate1h{capability=\"transcode:v1\",slo=\"availability\"} > (14.4 * 0.001)"
            ),
            "{page}"
        );
        assert!(page.contains("ratio_rate30m"), "{page}");
        assert_eq!(rules[7]["labels"]["severity"], "page");
        assert_eq!(rules[8]["labels"]["severity"], "ticket");
        let desc = rules[7]["annotations"]["description"].as_str().unwrap();
        assert!(desc.contains("2% of the 30days budget in 1h"), "{desc}");
    }

    #[test]
    fn slo_rules_latency_bucket_notes() {
        // (threshold ms, expected le, note contains)
        for (ms, le, note) in [
            (5000, Some(r"5(\\.0)?"), None),
            (300, Some(r"0\\.5"), Some("not a bucket boundary")),
            (120_000, Some(r"120(\\.0)?"), None),
            (300_001, None, Some("above the largest")),
        ] {
            let f = generate(&[slo(None, &[("p99", 0.99, ms)])], "mc");
            match note {
                Some(n) => assert!(f.notes.iter().any(|x| x.contains(n)), "{ms}: {:?}", f.notes),
                None => assert!(f.notes.is_empty(), "{ms}: {:?}", f.notes),
            }
            if let Some(n) = note {
                assert!(f.yaml.contains("# transcode:v1: latency p99") && f.yaml.contains(n));
            }
            match le {
                Some(le) => {
                    let v = parse(&f);
                    let expr = v["groups"][0]["rules"][0]["expr"].as_str().unwrap();
                    assert!(expr.contains(&format!("le=~\"{le}\"")), "{ms}: {expr}");
                }
                None => assert_eq!(f.recording_rules, 0),
            }
        }
    }

    #[test]
    fn le_matchers_take_both_prometheus_forms() {
        assert_eq!(le_matcher(120.0), r#"le=~"120(\\.0)?""#);
        assert_eq!(le_matcher(0.5), r#"le=~"0\\.5""#);
        assert_eq!(le_matcher(0.005), r#"le=~"0\\.005""#);
    }

    #[test]
    fn slo_rules_leave_out_burn_rates_a_budget_cannot_reach() {
        // A 50% budget (p50) can burn at most 2x: only the 1x ticket stays.
        let f = generate(&[slo(None, &[("p50", 0.5, 5000)])], "mc");
        assert_eq!(f.alerts, 1);
        let v = parse(&f);
        let ticket = &v["groups"][0]["rules"][7];
        assert_eq!(ticket["labels"]["severity"], "ticket");
        let expr = ticket["expr"].as_str().unwrap();
        assert!(
            expr.contains("ratio_rate3d") && !expr.contains("ratio_rate1d"),
            "{expr}"
        );
        assert_eq!(f.notes.len(), 3, "{:?}", f.notes);
    }

    #[test]
    fn slo_rules_without_routes_say_so() {
        let mut s = slo(Some(0.99), &[]);
        s.routes.clear();
        let f = generate(&[s], "mc");
        assert_eq!(f.recording_rules, 0);
        assert!(f.yaml.contains("# transcode:v1: no route"), "{}", f.yaml);
        parse(&f);
    }

    #[test]
    fn slo_rules_number_formatting() {
        assert_eq!(num(1.0 - 0.999), "0.001");
        assert_eq!(num(14.4), "14.4");
        assert_eq!(num(6.0), "6");
    }
}
