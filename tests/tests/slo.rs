//! `crankctl slo rules` and `crankctl slo check` end to end: the rules made
//! from deploy/mesh-config (every objective, the p99 of 2m included) pass
//! `promtool check rules`, and `promtool test
//! rules` feeds them series that burn the error budget (the page alert
//! fires, at the right time) and series that stay healthy (nothing fires).
//! The CI gate passes good load-test results and fails bad ones.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn crankctl(args: &[&str]) -> Output {
    Command::new(crank_tests::bin("crankctl"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

use crank_tests::{output_text as text, promtool};

/// One value per minute: `per_min[i]` added during minute i, from 0.
fn counter(per_min: impl IntoIterator<Item = u64>) -> String {
    let mut total = 0;
    let mut out = vec!["0".to_string()];
    for v in per_min {
        total += v;
        out.push(total.to_string());
    }
    out.join(" ")
}

/// Input series for `route="transcode"` (outbound): `ok`/`bad` requests
/// (2xx/5xx) per minute, and `fast` of them within 5s (the rest take
/// between 30s and 2m); every minute is given by `minute(i)` for i in
/// 0..minutes. The buckets' `le` as Prometheus 2 stores them (`le="5"`).
fn series(minutes: usize, minute: impl Fn(usize) -> (u64, u64, u64)) -> Value {
    series_le(minutes, "", minute)
}

/// [`series`] with `suffix` after each whole-number `le`: `".0"` is how
/// Prometheus 3 stores them (`le="5.0"`).
fn series_le(minutes: usize, suffix: &str, minute: impl Fn(usize) -> (u64, u64, u64)) -> Value {
    let sel = r#"direction="outbound",route="transcode""#;
    let m: Vec<_> = (0..minutes).map(minute).collect();
    let one = |name: String, values: String| {
        let mut s = serde_yaml::Mapping::new();
        s.insert("series".into(), name.into());
        s.insert("values".into(), values.into());
        Value::Mapping(s)
    };
    Value::Sequence(vec![
        one(
            format!("crank_requests_total{{{sel},status_class=\"2xx\"}}"),
            counter(m.iter().map(|x| x.0)),
        ),
        one(
            format!("crank_requests_total{{{sel},status_class=\"5xx\"}}"),
            counter(m.iter().map(|x| x.1)),
        ),
        one(
            format!("crank_request_duration_seconds_bucket{{{sel},le=\"5{suffix}\"}}"),
            counter(m.iter().map(|x| x.2)),
        ),
        one(
            format!("crank_request_duration_seconds_bucket{{{sel},le=\"30{suffix}\"}}"),
            counter(m.iter().map(|x| x.2)),
        ),
        one(
            format!("crank_request_duration_seconds_bucket{{{sel},le=\"120{suffix}\"}}"),
            counter(m.iter().map(|x| x.0 + x.1)),
        ),
        one(
            format!("crank_request_duration_seconds_count{{{sel}}}"),
            counter(m.iter().map(|x| x.0 + x.1)),
        ),
    ])
}

/// The alert the rules file defines for (slo, severity), as promtool
/// expects it: labels and annotations.
fn expected(rules: &Value, slo: &str, severity: &str) -> Value {
    let rule = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| {
            r["alert"].is_string()
                && r["labels"]["slo"] == slo
                && r["labels"]["severity"] == severity
        })
        .unwrap_or_else(|| panic!("no {severity} alert for {slo} in the rules"));
    let mut a = serde_yaml::Mapping::new();
    a.insert("exp_labels".into(), rule["labels"].clone());
    a.insert("exp_annotations".into(), rule["annotations"].clone());
    Value::Mapping(a)
}

fn at(eval_time: &str, alerts: Vec<Value>) -> Value {
    let mut m = serde_yaml::Mapping::new();
    m.insert("eval_time".into(), eval_time.into());
    m.insert("alertname".into(), "CrankSLOErrorBudgetBurn".into());
    m.insert("exp_alerts".into(), Value::Sequence(alerts));
    Value::Mapping(m)
}

fn test_case(input: Value, checks: Vec<Value>) -> Value {
    let mut t = serde_yaml::Mapping::new();
    t.insert("interval".into(), "1m".into());
    t.insert("input_series".into(), input);
    t.insert("alert_rule_test".into(), Value::Sequence(checks));
    Value::Mapping(t)
}

#[test]
fn slo_rules_pass_promtool_and_fire_only_when_the_budget_burns() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.yaml");
    let out = crankctl(&[
        "slo",
        "rules",
        "deploy/mesh-config",
        "-o",
        rules_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Every objective of the example has a bucket at its threshold (the
    // p99 of 2m too, since the 60s/120s/300s buckets): no "above the
    // largest bucket" note, and a recording rule per window for each of the
    // four objectives.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("above the largest"), "{}", text(&out));
    assert!(
        stderr.contains("wrote 28 recording rules and 7 alerts"),
        "{}",
        text(&out)
    );

    let check = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("SUCCESS"),
        "{}",
        text(&check)
    );

    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules_path).unwrap()).unwrap();
    let p99 = expected(&rules, "latency-p99", "page");
    assert_eq!(p99["exp_labels"]["slo"], "latency-p99");
    let measures_2m = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|r| {
            r["expr"]
                .as_str()
                .unwrap_or("")
                .contains(r#"le=~"120(\\.0)?""#)
        });
    assert!(
        measures_2m,
        "the p99 of 2m is measured with le=\"120\" or le=\"120.0\" (Prometheus 3)"
    );
    let page = expected(&rules, "availability", "page");
    let ticket = expected(&rules, "availability", "ticket");

    // Six healthy hours (100 requests a minute, all fast), then 10% fail:
    // 100x the 0.1% budget. The 1h window passes 14.4x the budget after
    // about 9 minutes (the 6h one only after about 22), so 5 minutes in
    // there is no page, 15 minutes in there is; the 6h/3d ticket is
    // already open at 5 minutes.
    let burn = test_case(
        series(390, |i| {
            if i < 360 {
                (100, 0, 100)
            } else {
                (90, 10, 100)
            }
        }),
        vec![
            at("300m", vec![]),
            at("365m", vec![ticket.clone()]),
            at("375m", vec![page.clone(), ticket.clone()]),
        ],
    );
    // Half the budget (0.05% errors) for six hours: nothing fires.
    let healthy = test_case(
        series(360, |_| (9995, 5, 10000)),
        vec![at("75m", vec![]), at("6h", vec![])],
    );
    // No errors, but every request between 30s and 2m: the p95 (30s) page
    // and ticket fire, and the p50's only alert, the 1x ticket (a 50%
    // budget cannot burn faster than 2x); the p99 (2m) holds.
    let slow_alerts = vec![at(
        "20m",
        vec![
            expected(&rules, "latency-p50", "ticket"),
            expected(&rules, "latency-p95", "page"),
            expected(&rules, "latency-p95", "ticket"),
        ],
    )];
    let slow = test_case(series(30, |_| (100, 0, 0)), slow_alerts.clone());
    // The same with the buckets as Prometheus 3 stores them (`le="5.0"`):
    // the same alerts. If the rules matched only `le="5"`, the latency
    // ratios would be empty and nothing would fire.
    let slow_prom3 = test_case(series_le(30, ".0", |_| (100, 0, 0)), slow_alerts);

    let mut file = serde_yaml::Mapping::new();
    file.insert("rule_files".into(), vec![Value::from("rules.yaml")].into());
    file.insert("evaluation_interval".into(), "1m".into());
    file.insert(
        "tests".into(),
        Value::Sequence(vec![burn, healthy, slow, slow_prom3]),
    );
    std::fs::write(
        dir.path().join("test.yaml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    let test = promtool(dir.path(), &["test", "rules", "test.yaml"]);
    assert!(test.status.success(), "{}", text(&test));
    assert!(
        String::from_utf8_lossy(&test.stdout).contains("SUCCESS"),
        "{}",
        text(&test)
    );
}

/// Route names with regex characters, two routes for one capability, a
/// threshold between buckets and a capability without a route: still
/// rules promtool accepts, and notes for what cannot be measured exactly.
#[test]
fn slo_rules_for_awkward_names_and_thresholds_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let mc = dir.path().join("mc");
    std::fs::create_dir_all(mc.join("routes")).unwrap();
    std::fs::create_dir_all(mc.join("slo")).unwrap();
    let write = |p: &str, t: &str| std::fs::write(mc.join(p), t).unwrap();
    write(
        "capabilities.yaml",
        "capabilities: [{name: hello:v1}, {name: lonely:v1}]\n",
    );
    write(
        "routes/r.yaml",
        "routes:\n  - name: hello.v1+canary\n    backends: [{capability: hello:v1}]\n  - name: hello\n    backends: [{capability: hello:v1}]\n",
    );
    write(
        "slo/hello.yaml",
        "capability: hello:v1\nslo:\n  latency: {p95: 300ms}\n  error_budget: 1%\n  measurement_window: 7d\n",
    );
    write(
        "slo/lonely.yaml",
        "capability: lonely:v1\nslo: {availability: 99%}\n",
    );
    let out = crankctl(&["slo", "rules", mc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("latency p95 300ms is not a bucket boundary; measured with le=\"0.5\""),
        "{}",
        text(&out)
    );
    assert!(stderr.contains("lonely:v1: no route"), "{}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        yaml.contains("# hello:v1: latency p95 300ms is not a bucket boundary"),
        "{yaml}"
    );
    // Regex-escaped for `=~`, then the backslashes escaped for PromQL.
    assert!(
        yaml.contains(r#"route=~"hello|hello\\.v1\\+canary""#),
        "{yaml}"
    );
    std::fs::write(dir.path().join("rules.yaml"), &yaml).unwrap();
    let check = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(check.status.success(), "{}", text(&check));
    // The escaped name matches that route only: a 25% error ratio, not
    // the `helloXv1+canary` route's errors that an unescaped `.` would take.
    let sel = |route: &str, class: &str| {
        format!(
            r#"crank_requests_total{{direction="outbound",route="{route}",status_class="{class}"}}"#
        )
    };
    let test = format!(
        "rule_files: [rules.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - {{series: '{}', values: '0+30x20'}}\n      - {{series: '{}', values: '0+10x20'}}\n      - {{series: '{}', values: '0+1000x20'}}\n    promql_expr_test:\n      - expr: crank:slo_errors:ratio_rate5m{{slo=\"availability\"}}\n        eval_time: 10m\n        exp_samples:\n          - {{labels: 'crank:slo_errors:ratio_rate5m{{capability=\"hello:v1\",slo=\"availability\"}}', value: 0.25}}\n",
        sel("hello.v1+canary", "2xx"),
        sel("hello.v1+canary", "5xx"),
        sel("helloXv1+canary", "5xx"),
    );
    std::fs::write(dir.path().join("test.yaml"), test).unwrap();
    let test = promtool(dir.path(), &["test", "rules", "test.yaml"]);
    assert!(test.status.success(), "{}", text(&test));
}

fn results(dir: &Path, name: &str, json: serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, json.to_string()).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn slo_check_passes_good_results_and_fails_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = results(
        dir.path(),
        "good.json",
        serde_json::json!({"capabilities": {"transcode:v1": {
            "requests": 2000, "error_rate": 0.0005,
            "latency_ms": {"p50": 3100, "p95": 21000, "p99": 70000}}}}),
    );
    let out = crankctl(&["slo", "check", "deploy/mesh-config", "--results", &good]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok")).count(),
        4,
        "{stdout}"
    );

    // 0.5% errors (5x the budget) and a p99 of 150s (the objective is 2m).
    let bad = results(
        dir.path(),
        "bad.json",
        serde_json::json!({"capabilities": {"transcode:v1": {
            "requests": 2000, "error_rate": 0.005,
            "latency_ms": {"p50": 3100, "p95": 21000, "p99": 150000}}}}),
    );
    let out = crankctl(&["slo", "check", "deploy/mesh-config", "--results", &bad]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("BROKEN  transcode:v1 availability: error rate 0.5% of 2000 requests (objective error rate <= 0.1%): +0.4 points (5.0x the budget)"),
        "{all}"
    );
    assert!(
        all.contains("BROKEN  transcode:v1 latency.p99: p99 2m 30s"),
        "{all}"
    );
    assert!(all.contains("+30s (25% over)"), "{all}");
    assert!(all.contains("2 objective(s) not met"), "{all}");

    let out = crankctl(&[
        "slo",
        "check",
        "deploy/mesh-config",
        "--results",
        &bad,
        "-o",
        "json",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let broken: Vec<&str> = v["objectives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["status"] == "broken")
        .map(|o| o["objective"].as_str().unwrap())
        .collect();
    assert_eq!(broken, ["availability", "latency.p99"]);
}
