//! The web dashboard end to end, in a real browser: crank-control with
//! `dashboard_listen` and a published mesh config, two enrolled sidecars
//! (frontend.demo calls backend.demo through its sidecar, and both push
//! traffic reports every second), and Debian's headless Chromium driven by
//! Playwright (tests/browser/dashboard.mjs). The page must show the two
//! workloads and the call between them, the certificates with their expiry,
//! and a policy denial provoked after it loaded, without a reload. The
//! screenshot is kept in target/screenshots/dashboard.png. The page alone
//! (tests/browser/resilience.mjs, no crank-control) must also survive
//! refusal times no `Date` can hold and a request that never gets an
//! answer. Node gets SIGTERM first, so that Playwright closes Chromium.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crank_tests::app::EchoApp;
use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::reporting::{client, control, server, BACKEND, FRONTEND};
use crank_tests::{curl, header, wait_until};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Ten requests a second through the frontend's sidecar until dropped.
struct Traffic(Arc<AtomicBool>);

impl Traffic {
    fn start(port: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                crank_tests::plain_get(port, "/hello");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic(stop)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// tests/browser/dashboard.mjs in Chromium; its JSON lines come on `events`.
struct Browser {
    child: Child,
    events: mpsc::Receiver<String>,
}

impl Browser {
    fn start(url: &str, shot: &Path, identities: &[&str], reason: &str) -> Browser {
        let script = repo().join("tests/browser/dashboard.mjs");
        assert!(
            repo().join("tests/browser/node_modules/playwright-core").exists(),
            "playwright-core is not installed: run `npm ci --prefix tests/browser` (tests/run.sh does)"
        );
        assert!(
            Path::new("/usr/bin/chromium").exists() || std::env::var_os("CHROMIUM").is_some(),
            "Chromium is missing: `apt-get install chromium` (tests/run.sh does), or set CHROMIUM"
        );
        let mut cmd = Command::new("node");
        cmd.arg(script).arg(url).arg(shot);
        for id in identities {
            cmd.args(["--identity", id]);
        }
        let mut child = cmd
            .args(["--reason", reason, "--timeout", "60"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("node is installed (tests/run.sh installs it)");
        let (tx, events) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Browser { child, events }
    }

    /// The next event; panics on an error event or after 90 s.
    fn next(&self, want: &str) -> serde_json::Value {
        let line = self
            .events
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("no {want:?} event from the browser script: {e}"));
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the browser script printed {line:?}: {e}"));
        assert_eq!(v["event"], want, "the browser script: {v:#}");
        v
    }
}

/// SIGTERM first, so that Playwright closes Chromium; SIGKILL after 10 s.
fn stop_node(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if crank_tests::wait_child(child, Duration::from_secs(10)).is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        stop_node(&mut self.child);
    }
}

/// "in 59m 58s", "expired 2m ago", "in 3650d": back to seconds.
fn seconds_of(text: &str) -> i64 {
    let sign = if text.starts_with("expired") { -1 } else { 1 };
    let total: i64 = text
        .split_whitespace()
        .filter_map(|w| {
            let (n, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit())?);
            let size = match unit {
                "d" => 86400,
                "h" => 3600,
                "m" => 60,
                "s" => 1,
                _ => return None,
            };
            Some(n.parse::<i64>().ok()? * size)
        })
        .sum();
    sign * total
}

fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("screenshots/dashboard.png")
}

fn has_call(state: &serde_json::Value) -> bool {
    state["edges"].as_array().is_some_and(|edges| {
        edges.iter().any(|e| {
            e["source"] == FRONTEND
                && e["destination"] == "hello:v1"
                && e["rps"].as_f64() > Some(0.0)
        })
    })
}

#[test]
fn the_dashboard_shows_the_mesh_and_a_new_denial_live_in_a_browser() {
    let app = EchoApp::start();
    let cp = control("99.9%", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = server(&cp, dir.path(), app.addr);
    let (cli, port) = client(&cp, dir.path());
    // Calls start once the route and its endpoint reached the caller, so
    // that the picture is not of the fallback route failing.
    wait_until(
        "the caller runs the pushed route",
        Duration::from_secs(20),
        || {
            let live = cp.dashboard_state()["routes"][0]["endpoints"][0]["live"] == true;
            live && cli
                .admin_get("/config_dump")
                .1
                .contains("\"source\": \"pushed\"")
        },
    );
    wait_until("a request goes through", Duration::from_secs(20), || {
        curl(&[&format!("http://{port}/hello")]).0 == 200
    });
    let _traffic = Traffic::start(port);
    let mut last = serde_json::Value::Null;
    wait_until("the call is on /api/state", Duration::from_secs(20), || {
        last = cp.dashboard_state();
        has_call(&last)
    });

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let url = format!("http://{}/", cp.dashboard_addr());
    let browser = Browser::start(&url, &shot, &[FRONTEND, BACKEND], "policy-denied");
    let loaded = browser.next("loaded");
    let denials = |v: &serde_json::Value| {
        v["refusals"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["reason"] == "policy-denied")
            .count()
    };
    assert_eq!(denials(&loaded), 0, "nothing denied yet: {loaded:#}");

    // The denial, provoked after the page loaded.
    let mut denied = String::new();
    wait_until(
        "the pushed policy denies /admin",
        Duration::from_secs(20),
        || {
            let (status, out) = curl(&[&format!("http://{port}/admin")]);
            denied = out;
            status == 403
        },
    );
    assert_eq!(
        header(&denied, "x-crank-error"),
        Some("policy-denied"),
        "{denied}"
    );
    let done = browser.next("done");
    eprintln!(
        "the dashboard showed: {done:#}\nscreenshot: {}",
        shot.display()
    );

    check_picture(&done);
    check_refusal(&done);
    check_certs(&done, &cp.dashboard_state());
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    drop((srv, cli));
}

/// A live page (no reload, no errors) that draws both workloads and the
/// call between them with its rate and success.
fn check_picture(done: &serde_json::Value) {
    assert_eq!(
        done["problems"],
        serde_json::json!([]),
        "console errors or CSP violations"
    );
    assert_eq!(done["same_document"], true, "the page was reloaded");
    assert!(done["updates"].as_u64() > done["updates_at_load"].as_u64());
    assert_eq!(done["error_banner"], serde_json::Value::Null);
    for id in [FRONTEND, BACKEND] {
        assert!(
            done["identities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == id),
            "{id} is not in the mesh picture: {done:#}"
        );
    }
    let call = done["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == FRONTEND && c["destination"] == "hello:v1")
        .unwrap_or_else(|| panic!("no call frontend -> hello:v1 drawn: {done:#}"));
    let label = call["label"].as_str().unwrap();
    assert!(
        label.contains(" rps · ") && label.ends_with("% ok"),
        "{label}"
    );
}

/// The provoked denial: its reason, status, request and who called.
fn check_refusal(done: &serde_json::Value) {
    let row = done["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "policy-denied")
        .unwrap_or_else(|| panic!("no policy-denied row: {done:#}"));
    assert_eq!(row["status"], 403, "{row}");
    assert_eq!(row["request"], "GET /admin", "{row}");
    assert!(
        row["route"].as_str().is_some_and(|r| !r.is_empty()),
        "{row}"
    );
    assert!(
        row["source"].as_str().unwrap().contains("frontend"),
        "the caller is named: {row}"
    );
}

/// Root, intermediate and the two leaves, each with its expiry shown
/// right: the cell read back agrees with `seconds_left` to its precision.
fn check_certs(done: &serde_json::Value, state: &serde_json::Value) {
    let certs = done["certs"].as_array().unwrap();
    for kind in ["root", "intermediate", "leaf"] {
        assert!(
            certs.iter().any(|c| c["kind"] == kind),
            "no {kind} row: {done:#}"
        );
    }
    let leaves = certs.iter().filter(|c| c["kind"] == "leaf").count();
    assert!(leaves >= 2, "a leaf per workload: {done:#}");
    for c in certs {
        let left = c["seconds_left"].as_i64().unwrap();
        let shown = seconds_of(c["expires_in"].as_str().unwrap());
        let precision = if left.abs() >= 86400 { 86400 } else { 3600 };
        assert!((shown - left).abs() < precision, "{c}: shows {shown}s");
        assert!(left > 0 && c["status"] != "expired", "{c}");
        if c["kind"] == "leaf" {
            // The harness issues 1 h leaves.
            assert!(left <= 3600 && shown > 50 * 60, "{c}");
        }
    }
    let served = state["certs"].as_array().unwrap().len();
    assert_eq!(
        certs.len(),
        served,
        "every certificate of /api/state is shown"
    );
}

/// tests/browser/resilience.mjs: refusal times no `Date` can hold (a
/// sidecar's clock far ahead) still render, and a request that never gets
/// an answer times out (3 polls) instead of stopping the polling.
#[test]
fn the_page_survives_impossible_times_and_a_hung_request() {
    assert!(
        repo()
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (tests/run.sh does)"
    );
    let mut child = Command::new("node")
        .arg(repo().join("tests/browser/resilience.mjs"))
        .args(["--timeout", "40"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("node is installed (tests/run.sh installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    stop_node(&mut child);
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("resilience.mjs printed {line:?}: {e}"));
    assert_eq!(v["event"], "done", "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["first"]["rows"], 3, "every refusal is a row: {v:#}");
    assert_eq!(v["first"]["times"][0], "–", "an impossible time: {v:#}");
    let banner = v["banner"].as_str().unwrap_or_default();
    assert!(banner.contains("no answer within 6 s"), "{v:#}");
    assert_eq!(v["banner_cleared"], true, "polling went on: {v:#}");
}

#[test]
fn the_dashboard_serves_its_own_assets_only_with_a_strict_policy() {
    let cp = ControlPlane::start(ControlOptions {
        dashboard: true,
        ..Default::default()
    });
    let base = format!("http://{}", cp.dashboard_addr());
    let (status, page) = curl(&[&format!("{base}/")]);
    assert_eq!(status, 200, "{page}");
    let csp = header(&page, "content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{page}"
    );
    assert_eq!(header(&page, "x-content-type-options"), Some("nosniff"));
    assert!(page.contains("<script src=\"app.js\""), "{page}");
    let (status, js) = curl(&[&format!("{base}/app.js")]);
    assert_eq!(
        (status, header(&js, "content-type")),
        (200, Some("text/javascript; charset=utf-8"))
    );
    let (status, out) = curl(&[&format!("{base}/api/state")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(header(&out, "cache-control"), Some("no-store"));
    let state = cp.dashboard_state();
    assert_eq!(state["trust_domain"], "crank.local");
    assert!(
        state["certs"].as_array().is_some_and(|c| !c.is_empty()),
        "{state}"
    );
    let (status, out) = curl(&["-X", "POST", &format!("{base}/api/state")]);
    assert_eq!(
        (status, header(&out, "allow")),
        (405, Some("GET, HEAD")),
        "{out}"
    );
    assert_eq!(
        curl(&["--path-as-is", &format!("{base}/../state/state.json")]).0,
        404
    );
    assert_eq!(curl(&[&format!("{base}/nope")]).0, 404);
    // A page served from elsewhere that rebinds its name to 127.0.0.1.
    let (status, out) = curl(&["-H", "Host: rebind.example", &format!("{base}/api/state")]);
    assert_eq!(status, 421, "{out}");
    assert!(!out.contains("trust_domain"), "{out}");
}
