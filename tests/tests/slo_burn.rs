//! SLOs against live traffic: a real Prometheus scrapes a real sidecar
//! pair while load runs through it with 10% of requests aborted (the
//! route's fault injection), with the rules of `crankctl slo rules`
//! loaded. The page burn-rate alert goes off, `crankctl slo status
//! --prometheus` shows the burn, and `crankctl slo check --prometheus`
//! fails on availability. Without Prometheus, `crankctl slo status
//! --proxy` reads the SLI from the sidecars' own counters.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crank_tests::load::Load;
use crank_tests::prometheus::Prometheus;
use crank_tests::raw_http::exchange;
use crank_tests::{bin, output_text as text, wait_until, FlakyApp, Mesh, MeshOptions};
use serde_json::Value;

fn crankctl(args: &[&str]) -> Output {
    Command::new(bin("crankctl")).args(args).output().unwrap()
}

/// A mesh config directory: route `backend` (the test mesh's) serves
/// `backend:v1`, whose SLO is 99.9% available and a p99 within 5s.
fn mesh_config(dir: &Path) -> PathBuf {
    let mc = dir.join("mesh-config");
    for d in ["routes", "slo"] {
        std::fs::create_dir_all(mc.join(d)).unwrap();
    }
    let write = |p: &str, t: &str| std::fs::write(mc.join(p), t).unwrap();
    write("capabilities.yaml", "capabilities: [{name: backend:v1}]\n");
    write(
        "routes/backend.yaml",
        "routes:\n  - name: backend\n    backends: [{capability: backend:v1}]\n",
    );
    write(
        "slo/backend.yaml",
        "capability: backend:v1\nslo:\n  availability: 99.9%\n  latency: {p99: 5s}\n  measurement_window: 30d\n",
    );
    mc
}

/// The objective named `name` of the only capability in a status report.
fn objective<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["capabilities"][0]["objectives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["objective"] == name)
        .unwrap_or_else(|| panic!("no {name} objective in {report}"))
}

/// A Prometheus scraping the mesh's client sidecar every second, with the
/// rules of `crankctl slo rules` for [`mesh_config`] loaded; and that
/// directory.
fn prometheus_with_slo_rules(mesh: &Mesh) -> (Prometheus, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mc = mesh_config(dir.path());
    let rules = dir.path().join("rules.yaml");
    let out = crankctl(&[
        "slo",
        "rules",
        mc.to_str().unwrap(),
        "-o",
        rules.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: crank-proxy\n    static_configs: [{{targets: [\"{}\"]}}]\n",
            rules.display(),
            mesh.client.admin
        ),
    )
    .unwrap();
    // The directory lives as long as the server that owns it.
    (Prometheus::start(dir), mc)
}

#[test]
fn slo_page_alert_fires_when_a_tenth_of_requests_fail() {
    let app = FlakyApp::start("app");
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            route_extra: "    fault: {abort: {percent: 10, status: 503}}\n".into(),
            ..Default::default()
        },
    );
    let load = Load::start(mesh.port, 2);
    let (prom, mc) = prometheus_with_slo_rules(&mesh);

    // 10% errors is 100x the 0.1% budget, past the page's 14.4x over both
    // 1h and 5m as soon as Prometheus has two scrapes. The rules have no
    // `for:`, so the alert fires at the first evaluation that sees it.
    wait_until(
        "the availability page alert",
        Duration::from_secs(30),
        || {
            prom.alerts().iter().any(|a| {
                a["labels"]["alertname"] == "CrankSLOErrorBudgetBurn"
                    && a["labels"]["capability"] == "backend:v1"
                    && a["labels"]["slo"] == "availability"
                    && a["labels"]["severity"] == "page"
                    && (a["state"] == "firing" || a["state"] == "pending")
            })
        },
    );

    let url = prom.url();
    status_shows_the_burn(&mc, &url);

    let out = crankctl(&[
        "slo",
        "check",
        mc.to_str().unwrap(),
        "--prometheus",
        &url,
        "--range",
        "5m",
    ]);
    let (ok, failed, _) = load.stop();
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("BROKEN  backend:v1 availability: error rate"),
        "{all}"
    );
    assert!(all.contains("x the budget)"), "{all}");
    assert!(all.contains("ok      backend:v1 latency.p99"), "{all}");
    assert!(all.contains("1 objective(s) not met"), "{all}");
    assert!(ok > 0 && failed > 0, "{ok} ok, {failed} failed");
}

/// `slo status --prometheus` while 10% of requests fail: the availability
/// objective burns faster than the page's 14.4x and its budget is spent;
/// `--fail-on-burn` turns that into exit 1.
fn status_shows_the_burn(mc: &Path, url: &str) {
    let out = crankctl(&[
        "slo",
        "status",
        mc.to_str().unwrap(),
        "--prometheus",
        url,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["capabilities"][0]["capability"], "backend:v1");
    assert_eq!(report["capabilities"][0]["window"], "30d");
    let a = objective(&report, "availability");
    let burn = a["burn_rates"]["5m"].as_f64().unwrap();
    assert!(
        burn > 14.4,
        "the 5m burn rate is above the page's 14.4x: {a}"
    );
    assert!(
        a["budget_left"].as_f64().unwrap() < 1.0,
        "budget consumed: {a}"
    );
    assert_eq!(a["page"], true, "{a}");
    // Fast requests: the latency objective is measured (its bucket matched,
    // `le="5"` or Prometheus 3's `le="5.0"`) and not burning.
    let p99 = objective(&report, "latency.p99");
    assert!(
        p99["burn_rates"]["5m"].as_f64().is_some_and(|b| b < 14.4),
        "a measured latency burn rate: {p99}"
    );
    assert_eq!(p99["page"], false, "{p99}");
    // The same, as a gate: --fail-on-burn turns the burn into exit 1.
    let out = crankctl(&[
        "slo",
        "status",
        mc.to_str().unwrap(),
        "--prometheus",
        url,
        "--fail-on-burn",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("backend:v1 availability"),
        "{}",
        text(&out)
    );
}

/// 100 requests through the mesh, the last 10 answered 500 by the app.
fn send_90_ok_then_10_failing(mesh: &Mesh, app: &FlakyApp) {
    let send = || {
        let req = "GET /x HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";
        exchange(mesh.port, req.as_bytes(), Duration::from_secs(10))
            .0
            .first()
            .map_or(0, |r| r.status)
    };
    for _ in 0..90 {
        assert_eq!(send(), 200);
    }
    app.fail_with(500);
    for _ in 0..10 {
        assert_eq!(send(), 500);
    }
}

#[test]
fn slo_status_from_the_sidecars_counts_since_they_started() {
    let app = FlakyApp::start("app");
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    send_90_ok_then_10_failing(&mesh, &app);
    let dir = tempfile::tempdir().unwrap();
    let mc = mesh_config(dir.path());
    let mc = mc.to_str().unwrap();
    let admin = mesh.client.admin.to_string();
    let status = |extra: &[&str]| {
        let mut args = vec![
            "slo",
            "status",
            mc,
            "--proxy",
            &admin,
            "--interval",
            "200ms",
        ];
        args.extend_from_slice(extra);
        crankctl(&args)
    };

    let out = status(&["-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cap = &report["capabilities"][0];
    assert_eq!(cap["window"], "since the sidecars started", "{report}");
    assert_eq!(cap["requests"], 100.0, "{report}");
    let a = objective(&report, "availability");
    assert!((a["sli"].as_f64().unwrap() - 0.9).abs() < 1e-9, "{a}");
    // 10% errors against a 0.1% budget: spent 100 times over.
    assert!(
        (a["budget_left"].as_f64().unwrap() + 99.0).abs() < 1e-6,
        "{a}"
    );
    // Nothing happened between the two scrapes: no current burn rate.
    let burns = a["burn_rates"].as_object().unwrap();
    assert_eq!(burns.len(), 1, "{a}");
    assert!(burns.values().all(Value::is_null), "{a}");

    let out = status(&[]);
    assert!(
        out.status.success(),
        "a spent budget exits 0 without --fail-on-burn: {}",
        text(&out)
    );
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("window since the sidecars started, 100 requests"),
        "{human}"
    );
    assert!(
        human.contains("availability") && human.contains("90%"),
        "{human}"
    );

    let out = status(&["--fail-on-burn"]);
    assert!(!out.status.success(), "{}", text(&out));

    // Failing requests between the two scrapes: a current burn rate of
    // 1000x (every request bad, against a 0.1% budget), at page speed.
    // The load runs before the first scrape and all through the second.
    let load = Load::start(mesh.port, 1);
    wait_until(
        "the load reaches the sidecar",
        Duration::from_secs(20),
        || outbound_5xx(&mesh.client.metrics()) >= 20,
    );
    let out = crankctl(&[
        "slo",
        "status",
        mc,
        "--proxy",
        &admin,
        "--interval",
        "1s",
        "-o",
        "json",
    ]);
    load.stop();
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = objective(&report, "availability");
    let (window, burn) = a["burn_rates"].as_object().unwrap().iter().next().unwrap();
    assert!(window.starts_with("last "), "{a}");
    assert!((burn.as_f64().unwrap() - 1000.0).abs() < 1e-6, "{a}");
    assert_eq!(a["page"], true, "{a}");
}

/// The sidecar's outbound 5xx count, from its /metrics.
fn outbound_5xx(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("crank_requests_total{")
                && l.contains(r#"direction="outbound""#)
                && l.contains(r#"status_class="5xx""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn slo_status_names_an_unreachable_prometheus_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let mc = mesh_config(dir.path());
    let mc = mc.to_str().unwrap();
    let url = format!("http://{}", crank_tests::proxy::free_addr());
    let out = crankctl(&["slo", "status", mc, "--prometheus", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach Prometheus at {url}")) && err.contains("--proxy"),
        "{err}"
    );
}
