//! The observability kit in `deploy/` against the real binaries: every
//! PromQL expression of the Grafana dashboard (`deploy/grafana/crank-mesh.json`)
//! names only metrics that a running sidecar pair, crank-control and
//! crank-shim export (or that docs/reference documents, for series that
//! appear on first use); the dashboard's queries and the scrape config
//! (`deploy/prometheus/prometheus.yml`) with its alert rules pass
//! `promtool`; and a real Prometheus, given the shipped scrape config with a
//! file_sd target file, scrapes a running sidecar pair and answers a
//! dashboard query with data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_tests::control::{ControlOptions, ControlPlane, EnrolledMesh};
use crank_tests::prometheus::Prometheus;
use crank_tests::proxy::free_addr;
use crank_tests::{curl, plain_get, wait_until, EchoApp, Mesh, MeshOptions, Shim};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/crank-mesh.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every PromQL expression of the dashboard, with where it is: panel
/// targets, and the selector inside each variable's `label_values(...)`.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                format!("panel {:?}", p["title"].as_str().unwrap_or_default()),
                expr.to_string(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().unwrap_or_default();
        out.push((
            format!("variable ${}", v["name"].as_str().unwrap_or_default()),
            variable_selector(q),
        ));
    }
    out
}

/// The series selector of a Grafana Prometheus variable query:
/// `label_values(SEL, label)` → `SEL`; `query_result(EXPR)` → `EXPR`.
fn variable_selector(q: &str) -> String {
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return args
            .rsplit_once(',')
            .map(|(sel, _)| sel.trim().to_string())
            .unwrap_or_default();
    }
    q.strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(q)
        .to_string()
}

/// Words that are never a metric name where they stand: operators,
/// modifiers and aggregations (which may be followed by `by (...)` rather
/// than by their parenthesis).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];

/// Metric name → the label names it has (or that a query uses on it).
type Labels = BTreeMap<String, BTreeSet<String>>;

/// What a PromQL expression reads: each metric it selects, with the labels
/// its matchers name, and the labels of its `by`/`without`/`on`/...
/// clauses.
#[derive(Default)]
struct Query {
    metrics: Labels,
    grouping: BTreeSet<String>,
}

/// Reads identifiers outside strings and ranges: those not functions,
/// keywords, numbers or Grafana variables are metric names; a `{...}` right
/// after one holds its matchers.
fn parse_query(expr: &str) -> Query {
    let chars: Vec<char> = expr.chars().collect();
    let mut q = Query::default();
    let mut i = 0;
    let mut group_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_quoted(&chars, i),
            '{' => i = skip_until(&chars, i, '}'),
            '[' => i = skip_until(&chars, i, ']'),
            '(' if group_next => {
                group_next = false;
                let end = skip_until(&chars, i, ')');
                let inside: String = chars[i + 1..end - 1].iter().collect();
                q.grouping.extend(
                    inside
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
                i = end;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next_at = i + chars[i..].iter().take_while(|c| c.is_whitespace()).count();
                let next = chars.get(next_at);
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    group_next = true;
                } else if !(word.starts_with('$')
                    || next == Some(&'(')
                    || KEYWORDS.contains(&lower.as_str()))
                {
                    let labels = q.metrics.entry(word).or_default();
                    if next == Some(&'{') {
                        let end = skip_until(&chars, next_at, '}');
                        labels.extend(matcher_labels(&chars[next_at + 1..end - 1]));
                        i = end;
                    }
                }
            }
            _ => i += 1,
        }
    }
    q
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    parse_query(expr).metrics.into_keys().collect()
}

/// The label names of `a="x", b=~"y"` (matchers, or a sample's labels).
fn matcher_labels(chars: &[char]) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            labels.insert(chars[start..i].iter().collect());
            while i < chars.len() && !matches!(chars[i], '"' | '\'' | '`') {
                i += 1;
            }
            i = skip_quoted(chars, i);
        } else {
            i += 1;
        }
    }
    labels
}

fn skip_quoted(chars: &[char], start: usize) -> usize {
    let q = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != q {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

fn skip_until(chars: &[char], start: usize, end: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != end {
        i = if matches!(chars[i], '"' | '\'' | '`') {
            skip_quoted(chars, i)
        } else {
            i + 1
        };
    }
    i + 1
}

#[test]
fn metric_names_are_found_in_promql_as_prometheus_reads_it() {
    let cases: &[(&str, &[&str])] = &[
        ("crank_ready", &["crank_ready"]),
        (
            r#"sum by (le, route) (rate(crank_x_bucket{a="b{c}",d=~"$route"}[$__rate_interval]))"#,
            &["crank_x_bucket"],
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(crank_h_bucket[5m])))",
            &["crank_h_bucket"],
        ),
        (
            "crank_a / on (instance) group_left (x) crank_b offset 5m > bool 1e3",
            &["crank_a", "crank_b"],
        ),
        (
            r#"min(crank_c{cert="leaf"}) - time() < 8 * 3600 and up unless absent(nope)"#,
            &["crank_c", "up", "nope"],
        ),
        ("sum without (reason) (crank_d) or vector(0)", &["crank_d"]),
    ];
    for (expr, want) in cases {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), want, "{expr}");
    }
    let q = parse_query(
        r#"sum by (le, route) (rate(crank_x_bucket{a="b,c=d", d =~ "$route"}[5m])) / on(instance) crank_y"#,
    );
    let labels = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(q.metrics["crank_x_bucket"], labels(&["a", "d"]));
    assert_eq!(q.metrics["crank_y"], labels(&[]));
    assert_eq!(q.grouping, labels(&["le", "route", "instance"]));
    assert_eq!(
        variable_selector(r#"label_values(crank_requests_total{direction=~"$direction"}, route)"#),
        r#"crank_requests_total{direction=~"$direction"}"#
    );
}

/// Metric names in Prometheus text with the labels of their samples, and
/// the `_bucket`/`_sum`/`_count` names of each declared histogram.
fn scraped_labels(text: &str) -> Labels {
    let mut known = Labels::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                add_series(&mut known, name, kind, BTreeSet::new());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let chars: Vec<char> = line[end..].chars().collect();
            let labels = if chars.first() == Some(&'{') {
                let close = skip_until(&chars, 0, '}').min(chars.len() + 1);
                matcher_labels(&chars[1..close - 1])
            } else {
                BTreeSet::new()
            };
            known
                .entry(line[..end].to_string())
                .or_default()
                .extend(labels);
        }
    }
    known
}

/// Adds a metric (a histogram as its three series, `le` on the buckets).
fn add_series(known: &mut Labels, name: &str, kind: &str, labels: BTreeSet<String>) {
    if kind == "histogram" {
        for suffix in ["_bucket", "_sum", "_count"] {
            let entry = known.entry(format!("{name}{suffix}")).or_default();
            entry.extend(labels.iter().cloned());
            if suffix == "_bucket" {
                entry.insert("le".into());
            }
        }
    } else {
        known.entry(name.to_string()).or_default().extend(labels);
    }
}

/// Metrics from the tables of a reference page
/// (`| \`crank_x\` | type | \`label\` (values), ... | meaning |`).
fn documented_labels(doc: &str) -> Labels {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let mut known = Labels::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        if let Some(name) = cells[1]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|n| n.starts_with("crank_"))
        {
            add_series(&mut known, name, cells[2], top_level_code(cells[3]));
        }
    }
    known
}

/// The `code` words of a labels cell outside parentheses: the label names,
/// not their values.
fn top_level_code(cell: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let (mut depth, mut code, mut word) = (0, false, String::new());
    for c in cell.chars() {
        match c {
            '`' if depth == 0 && code => {
                out.insert(std::mem::take(&mut word));
                code = false;
            }
            '`' if depth == 0 => code = true,
            '(' if !code => depth += 1,
            ')' if !code => depth -= 1,
            c if code => word.push(c),
            _ => {}
        }
    }
    out
}

fn merge(into: &mut Labels, from: Labels) {
    for (name, labels) in from {
        into.entry(name).or_default().extend(labels);
    }
}

/// What a sidecar pair (the server with the shipped policies, after a
/// request and a proxy-made 4xx/5xx), crank-control (metrics_listen) and an
/// exec-mode crank-shim serve at /metrics.
fn names_from_running_binaries() -> Labels {
    let app = EchoApp::start();
    let opts = MeshOptions {
        server_extra: format!(
            "policy:\n  inbound: {{dir: {}}}\n",
            repo().join("policies").display()
        ),
        ..Default::default()
    };
    let mesh = Mesh::start(app.addr, opts);
    let (status, out) = curl(&[&mesh.port_url("/")]);
    assert_eq!(status, 200, "a request through the sidecar pair: {out}");
    let proxy = format!("http://{}", mesh.http_proxy);
    let (status, out) = curl(&["-x", &proxy, "http://no-such-route/"]);
    assert!(status >= 400, "a request for no route: {out}");
    let mut names = scraped_labels(&mesh.client.metrics());
    merge(&mut names, scraped_labels(&mesh.server.metrics()));
    for name in [
        "crank_requests_total",
        "crank_proxy_errors_total",
        "crank_policy_decisions_total",
    ] {
        assert!(names.contains_key(name), "{name}: {names:?}");
    }
    merge(&mut names, control_plane_names());
    merge(&mut names, shim_names());
    names
}

/// crank-control (with a config directory) on its metrics_listen, and an
/// enrolled sidecar pair that watches its mesh config, after a request.
fn control_plane_names() -> Labels {
    let metrics = free_addr();
    let cp = ControlPlane::start(ControlOptions {
        extra: format!("metrics_listen: {metrics}\nconfig_dir: mesh\n"),
        ..Default::default()
    });
    let app = EchoApp::start();
    let mesh = EnrolledMesh::start(&cp, app.addr, "mesh:\n  watch_wait: 2s\n");
    let url = format!("http://{}/", mesh.port);
    assert_eq!(curl(&[&url]).0, 200, "a request through enrolled sidecars");
    let (status, text) = plain_get(metrics, "/metrics");
    assert_eq!(status, 200, "crank-control metrics_listen: {text}");
    let mut names = scraped_labels(&text);
    merge(&mut names, scraped_labels(&mesh.client.metrics()));
    merge(&mut names, scraped_labels(&mesh.server.metrics()));
    for name in [
        "crank_ca_workloads",
        "crank_ca_certs_issued_total",
        "crank_cert_renewals_total",
    ] {
        assert!(names.contains_key(name), "{name}: {names:?}");
    }
    names
}

/// An exec-mode crank-shim after one job ran.
fn shim_names() -> Labels {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\n\
         host: {{nvml: false, powercap_root: {d}/no-powercap}}\n\
         exec:\n  work_dir: {d}/work\n  command: [sh, -c, 'echo done > \"$1\"', sh, \"{{output}}\"]\n",
        d = dir.path().display()
    );
    let shim = Shim::start(dir.path(), "shim", &yaml, listen, admin);
    let submit = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data-binary",
        "{}",
    ];
    let (status, out) = curl(&[&submit[..], &[shim.url("/v1/jobs").as_str()]].concat());
    assert_eq!(status, 201, "submit a job: {out}");
    let mut text = String::new();
    wait_until("the job finished", Duration::from_secs(10), || {
        text = shim.metrics();
        text.contains("crank_jobs_finished_total{")
    });
    let names = scraped_labels(&text);
    assert!(names.contains_key("crank_job_run_seconds_bucket"), "{text}");
    names
}

/// Labels every series has from its scrape target (Prometheus's `job` and
/// `instance`, and the `service` label of deploy/prometheus's targets).
const TARGET_LABELS: &[&str] = &["job", "instance", "service", "__name__"];

#[test]
fn dashboard_queries_name_only_metrics_and_labels_the_binaries_export() {
    let d = dashboard();
    let exported = names_from_running_binaries();
    let mut known = exported.clone();
    merge(&mut known, documented_labels("docs/reference/metrics.md"));
    merge(
        &mut known,
        documented_labels("docs/reference/control-api.md"),
    );
    // Prometheus's own per-target series.
    known.insert("up".into(), BTreeSet::new());

    let mut unknown = Vec::new();
    let mut docs_only = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (place, expr) in dashboard_exprs(&d) {
        let q = parse_query(&expr);
        assert!(!q.metrics.is_empty(), "{place}: no metric in {expr:?}");
        let mut of_expr: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        for (name, matchers) in &q.metrics {
            used.insert(name.clone());
            let Some(labels) = known.get(name) else {
                unknown.push(format!("metric {name} ({place})"));
                continue;
            };
            if !exported.contains_key(name) && name != "up" {
                docs_only.insert(name.clone());
            }
            of_expr.extend(labels.iter().map(String::as_str));
            for l in matchers {
                if !labels.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                    unknown.push(format!("label {l} of {name} ({place}); it has {labels:?}"));
                }
            }
        }
        for l in &q.grouping {
            if !of_expr.contains(l.as_str()) {
                unknown.push(format!(
                    "grouping label {l} ({place}): none of its metrics has it"
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries what no binary exports and docs/reference does not document:\n  {}",
        unknown.join("\n  ")
    );
    eprintln!("dashboard metrics known from docs/reference only (they appear on first use): {docs_only:?}");
    // The rows the dashboard promises, each with data behind it.
    for name in [
        "crank_requests_total",
        "crank_request_duration_seconds_bucket",
        "crank_proxy_errors_total",
        "crank_circuit_state",
        "crank_cert_expiry_timestamp_seconds",
        "crank_policy_decisions_total",
        "crank_mesh_config_seq",
        "crank_open_connections",
        "crank_spans_dropped_total",
        "crank_jobs",
        "crank_job_energy_joules_sum",
        "crank_ca_workloads",
    ] {
        assert!(
            used.contains(name),
            "the dashboard has no panel over {name}"
        );
    }
}

#[test]
fn dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39, "schemaVersion");
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    for name in ["instance", "direction", "route", "capability"] {
        assert!(vars.iter().any(|v| v["name"] == name), "no variable {name}");
    }
    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            rows.push(p["title"].as_str().unwrap().to_string());
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }
    for want in [
        "Traffic",
        "Errors",
        "Resilience",
        "Identity",
        "Policy",
        "Mesh config",
        "Connections",
        "Tracing",
        "Worker shim",
        "Control plane",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(want)),
            "no row {want}: {rows:?}"
        );
    }
}

use crank_tests::{output_text as text, promtool};

/// A dashboard expression as Prometheus gets it after Grafana fills in the
/// variables ("All" is `.*`).
fn as_sent(expr: &str, rate_interval: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__range", rate_interval);
    let mut out = String::new();
    let mut rest = expr.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let name_len = rest[at + 1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - at - 1);
        out.push_str(".*");
        rest = &rest[at + 1 + name_len..];
    }
    out.push_str(rest);
    out
}

#[test]
fn scrape_config_and_dashboard_queries_pass_promtool() {
    let dir = repo().join("deploy/prometheus");
    let check = promtool(&dir, &["check", "config", "prometheus.yml"]);
    let out = text(&check);
    assert!(check.status.success(), "promtool check config:\n{out}");
    for rules in [
        "cert-alerts.yml",
        "../compose/alerts.yml",
        "shim-alerts.yml",
    ] {
        assert!(
            out.contains(&format!("Checking {rules}")),
            "{rules} not loaded:\n{out}"
        );
    }

    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("prometheus.yml")).unwrap())
            .unwrap();
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| {
            let name = j["job_name"].as_str().unwrap();
            assert!(
                !j["file_sd_configs"].is_null(),
                "job {name} has no file_sd_configs"
            );
            name
        })
        .collect();
    assert_eq!(
        jobs,
        [
            "crank-proxy",
            "crank-control",
            "crank-shim",
            "crank-shim-gpu"
        ]
    );

    // The shim's alert rules are the ones docs/guides/sre.md shows.
    let guide = std::fs::read_to_string(repo().join("docs/guides/sre.md")).unwrap();
    let at = guide
        .find("  - name: crank-shim\n")
        .expect("the shim alerts in sre.md");
    let start = guide[..at].rfind("```yaml\n").unwrap() + "```yaml\n".len();
    let end = at + guide[at..].find("```").unwrap();
    let shown: serde_yaml::Value = serde_yaml::from_str(&guide[start..end]).unwrap();
    let shipped: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("shim-alerts.yml")).unwrap())
            .unwrap();
    assert_eq!(
        shipped, shown,
        "shim-alerts.yml and docs/guides/sre.md differ"
    );

    // Every dashboard expression, with its variables filled in, is valid
    // PromQL: as recording rules, `promtool check rules` parses each.
    let tmp = tempfile::tempdir().unwrap();
    let rules: Vec<_> = dashboard_exprs(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(i, (place, expr))| {
            serde_json::json!({"record": format!("dashboard:q{i}"), "expr": as_sent(&expr, "5m"), "labels": {"from": place}})
        })
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(tmp.path().join("dash.yml"), file.to_string()).unwrap();
    let check = promtool(tmp.path(), &["check", "rules", "dash.yml"]);
    assert!(
        check.status.success(),
        "dashboard PromQL:\n{}",
        text(&check)
    );
}

/// The shipped prometheus.yml, made to run in `dir`: scrape every second,
/// rule files and file_sd globs resolved (rule files from deploy/prometheus,
/// targets from `dir`), and no static example targets.
fn local_config(dir: &Path) -> serde_yaml::Value {
    let shipped = repo().join("deploy/prometheus");
    let mut c: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(shipped.join("prometheus.yml")).unwrap())
            .unwrap();
    c["global"]["scrape_interval"] = "1s".into();
    c["global"]["evaluation_interval"] = "1s".into();
    for r in c["rule_files"].as_sequence_mut().unwrap() {
        *r = shipped
            .join(r.as_str().unwrap())
            .display()
            .to_string()
            .into();
    }
    for job in c["scrape_configs"].as_sequence_mut().unwrap() {
        job.as_mapping_mut().unwrap().remove("static_configs");
        for sd in job["file_sd_configs"].as_sequence_mut().unwrap() {
            for f in sd["files"].as_sequence_mut().unwrap() {
                *f = dir.join(f.as_str().unwrap()).display().to_string().into();
            }
        }
    }
    c
}

#[test]
fn prometheus_scrapes_a_sidecar_pair_listed_in_a_file_sd_file() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    for _ in 0..3 {
        assert_eq!(curl(&[&mesh.port_url("/")]).0, 200);
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("targets")).unwrap();
    let sidecars = [mesh.client.admin.to_string(), mesh.server.admin.to_string()];
    std::fs::write(
        dir.path().join("targets/crank-proxy.yml"),
        format!(
            "- targets: [\"{}\", \"{}\"]\n  labels: {{service: demo}}\n",
            sidecars[0], sidecars[1]
        ),
    )
    .unwrap();
    let config = local_config(dir.path());
    std::fs::write(
        dir.path().join("prometheus.yml"),
        serde_yaml::to_string(&config).unwrap(),
    )
    .unwrap();
    let prom = Prometheus::start(dir);

    wait_until(
        "both sidecars up in prometheus",
        Duration::from_secs(15),
        || {
            let up = prom.query(r#"up{job="crank-proxy"} == 1"#);
            let mut seen: Vec<_> = up
                .iter()
                .filter(|s| s["metric"]["service"] == "demo")
                .map(|s| {
                    s["metric"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            seen.sort();
            let mut want = sidecars.to_vec();
            want.sort();
            seen == want
        },
    );

    // The dashboard's request rate panel, as Grafana sends it with "All".
    let d = dashboard();
    let panel = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Request rate by route and direction")
        .expect("the request rate panel");
    let expr = as_sent(panel["targets"][0]["expr"].as_str().unwrap(), "10s");
    wait_until(
        "the request rate panel's query returns data",
        Duration::from_secs(15),
        || {
            let result = prom.query(&expr);
            result.iter().any(|s| {
                s["metric"]["route"] == "backend" && s["metric"]["direction"] == "outbound"
            }) && result.iter().any(|s| s["metric"]["direction"] == "inbound")
        },
    );
}
