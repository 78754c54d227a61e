//! `crankctl check` end to end: a real crank-control and enrolled sidecars.
//! A healthy mesh exits 0; then each checked thing is broken in turn (a
//! killed sidecar, a hung one whose certificate expires, a proxy that
//! refused the published version and so runs other policies, the control
//! plane gone) and the report names it, with its fix, and the exit code.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crank_tests::app::EchoApp;
use crank_tests::control::{ControlOptions, ControlPlane, EnrolledMesh};
use crank_tests::proxy::{free_addr, Proxy};

/// `crankctl check ARGS` against `socket`: exit code and stdout + stderr.
fn check_at(socket: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(crank_tests::bin("crankctl"))
        .arg("check")
        .args(args)
        .env("CRANK_CONTROL", socket)
        .output()
        .expect("run crankctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn socket(cp: &ControlPlane) -> std::path::PathBuf {
    cp.path().join("state/admin.sock")
}

fn check(cp: &ControlPlane) -> (i32, String) {
    check_at(&socket(cp), &[])
}

fn check_json(cp: &ControlPlane) -> (i32, serde_json::Value) {
    let (code, text) = check_at(&socket(cp), &["-o", "json"]);
    (
        code,
        serde_json::from_str(&text).expect("check -o json is JSON"),
    )
}

/// Runs `crankctl check` until `ok` holds for (code, report); bounded.
fn check_until(
    cp: &ControlPlane,
    what: &str,
    timeout: Duration,
    ok: impl Fn(i32, &str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let (code, text) = check(cp);
        if ok(code, &text) {
            eprintln!("crankctl check (exit {code}):\n{text}");
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last report (exit {code}):\n{text}\n{}",
            cp.ctl_ok(&["status"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The line of `level` and `check` that mentions `needle`, and its fix.
fn finding<'a>(
    text: &'a str,
    level: &str,
    check: &str,
    needle: &str,
) -> Option<(&'a str, &'a str)> {
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().enumerate().find_map(|(i, l)| {
        let mut words = l.split_whitespace();
        (words.next() == Some(level) && words.next() == Some(check) && l.contains(needle))
            .then(|| (*l, lines.get(i + 1).copied().unwrap_or("")))
    })
}

fn write(cp: &ControlPlane, rel: &str, text: &str) {
    cp.write_mesh_file(rel, text);
}

const ROUTE: &str =
    "routes:\n  - name: backend\n    match: {hosts: [backend]}\n    backends: [{capability: hello:v1}]\n";

/// crank-control with a config directory, short leases and a mesh route.
fn mesh_control() -> ControlPlane {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\nregistry: {lease: 2s}\n".into(),
        ..Default::default()
    });
    write(
        &cp,
        "capabilities.yaml",
        "capabilities:\n  - name: hello:v1\n",
    );
    write(&cp, "routes/backend.yaml", ROUTE);
    cp
}

/// A sidecar in front of `app` that registers `hello:v1` (backend.demo).
fn server(cp: &ControlPlane, dir: &Path, name: &str, app: std::net::SocketAddr) -> Proxy {
    let (inbound, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {app}}}\nmesh:\n  watch_wait: 2s\n  register:\n    capabilities: [hello:v1]\n    lease: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, name, "backend", "demo", "2s"),
    );
    Proxy::start(dir, name, &yaml, admin)
}

/// A sidecar (frontend.demo) whose port is bound to route `backend`.
fn client(cp: &ControlPlane, dir: &Path, name: &str) -> Proxy {
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, name, "frontend", "demo", "2s"),
    );
    Proxy::start(dir, name, &yaml, admin)
}

fn healthy(cp: &ControlPlane, proxies: usize) -> String {
    let want = format!("{proxies} proxy(ies) on v");
    check_until(
        cp,
        "a healthy report",
        Duration::from_secs(15),
        |code, t| code == 0 && t.contains(&want) && t.contains("1 endpoint(s) with live leases"),
    )
}

#[test]
fn a_healthy_mesh_passes_and_a_killed_sidecar_fails_naming_it() {
    let app = EchoApp::start();
    let cp = mesh_control();
    let dir = tempfile::tempdir().unwrap();
    let srv = server(&cp, dir.path(), "srv", app.addr);
    let _cli = client(&cp, dir.path(), "cli");
    let text = healthy(&cp, 2);
    assert!(
        text.lines()
            .take_while(|l| !l.is_empty())
            .all(|l| l.starts_with("ok ")),
        "{text}"
    );
    assert!(text.contains("0 failed, 0 warning(s)"), "{text}");
    let (code, v) = check_json(&cp);
    assert_eq!((code, &v["exit_code"]), (0, &serde_json::json!(0)), "{v}");
    let checks: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for name in [
        "control",
        "clock",
        "config",
        "proxies",
        "policy",
        "ca",
        "certs",
        "rotation",
        "endpoints",
    ] {
        assert!(checks.contains(&name), "{name} missing: {v}");
    }

    // kill -9 the server's sidecar: silent after 3 watch periods (6 s).
    srv.signal(libc::SIGKILL);
    let text = check_until(
        &cp,
        "the killed sidecar named",
        Duration::from_secs(20),
        |code, t| code == 1 && finding(t, "FAIL", "proxies", "backend.demo.crank.local").is_some(),
    );
    let (line, fix) = finding(&text, "FAIL", "proxies", "backend.demo.crank.local").unwrap();
    assert!(line.contains("silent for"), "{text}");
    assert!(
        fix.contains("fix: ") && fix.contains("systemctl restart crank-proxy@backend"),
        "{text}"
    );
    assert!(
        finding(&text, "FAIL", "proxies", "frontend.demo").is_none(),
        "the live client is not blamed:\n{text}"
    );
}

#[test]
fn a_hung_sidecar_whose_certificate_expires_is_named() {
    let app = EchoApp::start();
    let cp = ControlPlane::start(ControlOptions {
        leaf_ttl: "12s",
        ..Default::default()
    });
    let m = EnrolledMesh::start(&cp, app.addr, "");
    check_until(
        &cp,
        "a healthy report",
        Duration::from_secs(15),
        |code, t| code == 0 && t.contains("2 workload certificate(s) renewed in time"),
    );
    // SIGSTOP: the server's sidecar stops renewing; its 12 s leaf runs out.
    m.server.signal(libc::SIGSTOP);
    let text = check_until(
        &cp,
        "the expired certificate named",
        Duration::from_secs(25),
        |code, t| code == 1 && finding(t, "FAIL", "certs", "backend.demo.crank.local").is_some(),
    );
    m.server.signal(libc::SIGCONT);
    let (line, fix) = finding(&text, "FAIL", "certs", "backend.demo.crank.local").unwrap();
    assert!(line.contains("certificate expired"), "{text}");
    assert!(
        fix.contains("crankctl token create --service backend --tenant demo"),
        "{text}"
    );
    assert!(
        finding(&text, "FAIL", "certs", "frontend.demo").is_none(),
        "the client renews and is not blamed:\n{text}"
    );
}

#[test]
fn a_proxy_that_refused_a_version_runs_other_policies_and_fails() {
    let app = EchoApp::start();
    let cp = mesh_control();
    let dir = tempfile::tempdir().unwrap();
    let _srv = server(&cp, dir.path(), "srv", app.addr);
    let _cli = client(&cp, dir.path(), "cli");
    healthy(&cp, 2);

    // One edit the client cannot run (its port's route is renamed away),
    // with a new policy set: the server applies it, the client refuses it
    // and keeps v1 and the old policies.
    write(
        &cp,
        "routes/backend.yaml",
        "routes:\n  - name: renamed\n    backends: [{capability: hello:v1}]\n",
    );
    write(&cp, "policies/policy.yaml", "mode: enforce\n");
    write(
        &cp,
        "policies/open.rego",
        "package crank.authz\n\nallow := true\n\ndeny contains \"never\" if {\n\tfalse\n}\n",
    );
    let text = check_until(
        &cp,
        "the diverged client named",
        Duration::from_secs(20),
        |code, t| {
            code == 1
                && finding(t, "FAIL", "policy", "frontend.demo.crank.local").is_some()
                && finding(t, "FAIL", "proxies", "frontend.demo.crank.local").is_some()
                // and the server has applied the new version (it watches on
                // its own schedule, so it may lag the client's refusal).
                && finding(t, "FAIL", "proxies", "backend.demo").is_none()
        },
    );
    let (line, fix) = finding(&text, "FAIL", "proxies", "frontend.demo.crank.local").unwrap();
    assert!(line.contains("runs config v1"), "{text}");
    assert!(fix.contains("mesh.last_rejected"), "{text}");
    let (line, _) = finding(&text, "FAIL", "policy", "frontend.demo.crank.local").unwrap();
    assert!(
        line.contains("is published") && !line.contains("backend.demo"),
        "{text}"
    );
    assert!(
        finding(&text, "FAIL", "proxies", "backend.demo").is_none(),
        "the server applied it:\n{text}"
    );
    let (code, v) = check_json(&cp);
    assert_eq!(code, 1);
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "policy" && c["level"] == "fail" && c["fix"].is_string()),
        "{v}"
    );
}

#[test]
fn a_control_plane_that_is_down_exits_2_naming_the_socket() {
    let mut cp = ControlPlane::start(ControlOptions::default());
    let (code, text) = check(&cp);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("no config_dir: crank-control is only the CA"),
        "{text}"
    );
    cp.kill();
    let sock = socket(&cp);
    let (code, text) = check(&cp);
    assert_eq!(code, 2, "{text}");
    let (line, fix) = finding(&text, "FAIL", "control", "cannot reach").expect(&text);
    assert!(line.contains(&sock.display().to_string()), "{text}");
    assert!(fix.contains("start crank-control"), "{text}");
    let (code, v) = check_json(&cp);
    assert_eq!((code, &v["exit_code"]), (2, &serde_json::json!(2)), "{v}");
    // --strict does not change it; a path where nothing ever ran neither.
    assert_eq!(check_at(&cp.path().join("nope.sock"), &["--strict"]).0, 2);
}
