//! The data behind the dashboard, end to end: two enrolled sidecars push
//! traffic reports every second (`mesh.report_interval: 1s`) to a real
//! crank-control with a published config (route, SLO, outbound quota,
//! policy), and `GET /api/state` on its dashboard listener shows the call
//! frontend.demo → hello:v1 with its rate, success rate and exact counts,
//! the SLO budget they leave, the certificates with their expiry, the route
//! with its endpoint, and the policy denial and the quota refusal with
//! their reasons and callers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crank_tests::control::ControlPlane;
use crank_tests::reporting::{client, control, server, BACKEND, FRONTEND};
use crank_tests::{plain_get, wait_until, FlakyApp};
use serde_json::Value;

/// Steady traffic (about 10/s) fits; a burst of 60 does not.
const QUOTA: &str = "limits:\n  - {tenant: demo, capability: hello:v1, rate: 30/s, burst: 30, direction: outbound}\n";

/// Every request sent through the frontend's sidecar, and its 5xx.
#[derive(Default)]
struct Sent {
    total: AtomicU64,
    errors: AtomicU64,
}

impl Sent {
    fn get(&self, port: SocketAddr, path: &str) -> u16 {
        let (status, _) = plain_get(port, path);
        if status == 0 {
            return 0; // not answered: not counted by the sidecar either
        }
        self.total.fetch_add(1, Ordering::SeqCst);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        status
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
        )
    }
}

/// Sends from 4 threads at once until one gets a 429 (at most 200 each):
/// sequential requests on a slow machine may stay under 30/s.
fn burst_until_limited(sent: &Arc<Sent>, port: SocketAddr) -> bool {
    let hit = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (sent, hit) = (sent.clone(), hit.clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    if hit.load(Ordering::SeqCst) {
                        break;
                    }
                    if sent.get(port, "/hello") == 429 {
                        hit.store(true, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    hit.load(Ordering::SeqCst)
}

/// About ten requests a second until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(port: SocketAddr, sent: Arc<Sent>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                sent.get(port, "/hello");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn edge(state: &Value) -> Option<&Value> {
    state["edges"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == FRONTEND && e["destination"] == "hello:v1")
}

/// Polls `/api/state` until `ok` holds (30 s at most); returns that state.
fn state_until(cp: &ControlPlane, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let state = cp.dashboard_state();
        if ok(&state) {
            return state;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; the last state:\n{state:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_dashboard_state_shows_calls_rates_slos_certs_routes_and_refusals() {
    let app = FlakyApp::start("backend");
    let cp = control("90%", &[("quotas.yaml", QUOTA)]);
    let dir = tempfile::tempdir().unwrap();
    let (srv, inbound) = server(&cp, dir.path(), app.addr);
    let (cli, port) = client(&cp, dir.path());
    let sent = Arc::new(Sent::default());
    wait_until("a request goes through", Duration::from_secs(20), || {
        sent.get(port, "/hello") == 200
    });

    // Healthy traffic: a rate and a success rate of 1.
    let traffic = Traffic::start(port, sent.clone());
    let s = state_until(&cp, "the call at full success", |s| {
        edge(s).is_some_and(|e| e["rps"].as_f64() > Some(0.0) && e["success_rate"] == 1.0)
    });
    let e = edge(&s).unwrap();
    let rps = e["rps"].as_f64().unwrap();
    assert!(rps > 1.0 && rps < 30.0, "about 10 requests a second: {e}");
    assert_eq!(e["route"], "backend");
    assert!(e["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{e}");

    // The app fails: the rate over the last interval says so.
    app.fail_with(500);
    state_until(&cp, "the failures in the success rate", |s| {
        edge(s).is_some_and(|e| e["success_rate"].as_f64().is_some_and(|r| r < 0.5))
    });
    app.fail_with(0);
    drop(traffic);

    // A denial by the backend's pushed policy, and a burst past the quota.
    wait_until(
        "the pushed policy denies /admin",
        Duration::from_secs(20),
        || sent.get(port, "/admin") == 403,
    );
    assert!(
        burst_until_limited(&sent, port),
        "a burst of up to 800 requests from 4 threads never went past the quota (30/s, burst 30)"
    );

    // Once both sidecars reported everything: exact counts and refusals.
    let (total, errors) = sent.counts();
    let s = state_until(&cp, "every request and the refusals reported", |s| {
        edge(s).is_some_and(|e| e["requests"] == total)
            && refusal(s, "policy-denied").is_some()
            && refusal(s, "rate-limited").is_some()
    });
    let e = edge(&s).unwrap();
    assert_eq!(
        (e["requests"].as_u64(), e["errors"].as_u64()),
        (Some(total), Some(errors)),
        "{e}"
    );
    assert!(errors > 0, "some requests failed with 500");
    check_slo(&s, total, errors);
    check_refusals(&s);
    check_certs(&s);
    check_route_and_workloads(&s, inbound);
    drop((srv, cli));
}

fn refusal<'a>(s: &'a Value, reason: &str) -> Option<&'a Value> {
    s["refusals"]
        .as_array()?
        .iter()
        .find(|r| r["reason"] == reason)
}

/// availability 90%: budget_left = 1 - (errors/total) / 0.1.
fn check_slo(s: &Value, total: u64, errors: u64) {
    let slo = s["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["capability"] == "hello:v1")
        .unwrap_or_else(|| panic!("no SLO row: {s:#}"));
    assert_eq!(
        (slo["requests"].as_u64(), slo["errors"].as_u64()),
        (Some(total), Some(errors))
    );
    let sli = 1.0 - errors as f64 / total as f64;
    assert!((slo["sli"].as_f64().unwrap() - sli).abs() < 1e-9, "{slo}");
    assert!((slo["availability"].as_f64().unwrap() - 0.9).abs() < 1e-9);
    let budget = 1.0 - (1.0 - sli) / 0.1;
    assert!(
        (slo["budget_left"].as_f64().unwrap() - budget).abs() < 1e-6,
        "{slo}"
    );
}

/// The denial is the backend's (inbound, naming its caller); the quota
/// refusal the frontend's own (outbound, on the route). Newest first.
fn check_refusals(s: &Value) {
    let all = s["refusals"].as_array().unwrap();
    assert!(all.len() <= 50);
    let at: Vec<u64> = all.iter().map(|r| r["at_ms"].as_u64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first: {at:?}");
    let d = refusal(s, "policy-denied").unwrap();
    assert_eq!(
        (d["status"].as_u64(), d["proxy"].as_str()),
        (Some(403), Some(BACKEND)),
        "{d}"
    );
    assert_eq!(
        (d["method"].as_str(), d["path"].as_str()),
        (Some("GET"), Some("/admin")),
        "{d}"
    );
    assert_eq!(d["source"], FRONTEND, "{d}");
    let q = refusal(s, "rate-limited").unwrap();
    assert_eq!(
        (q["status"].as_u64(), q["proxy"].as_str()),
        (Some(429), Some(FRONTEND)),
        "{q}"
    );
    assert_eq!(
        (q["route"].as_str(), q["path"].as_str()),
        (Some("backend"), Some("/hello")),
        "{q}"
    );
    assert!(q["instance"].as_str().is_some_and(|i| !i.is_empty()), "{q}");
}

/// The root, the signing intermediate and each sidecar's 1 h leaf.
fn check_certs(s: &Value) {
    let now = s["generated_at"].as_i64().unwrap();
    let certs = s["certs"].as_array().unwrap();
    for kind in ["root", "intermediate"] {
        let c = certs
            .iter()
            .find(|c| c["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {s:#}"));
        assert_eq!(c["status"], "valid", "{c}");
        assert!(c["seconds_left"].as_i64() > Some(30 * 86400), "{c}");
    }
    for id in [FRONTEND, BACKEND] {
        let c = certs
            .iter()
            .find(|c| c["kind"] == "leaf" && c["subject"] == id)
            .unwrap_or_else(|| panic!("no leaf of {id}: {s:#}"));
        let left = c["seconds_left"].as_i64().unwrap();
        assert_eq!(c["not_after"].as_i64().unwrap() - now, left, "{c}");
        assert!(left > 0 && left <= 3600, "{c}");
        assert!(!c["serial"].as_str().unwrap().is_empty());
        assert_ne!(c["status"], "expired");
    }
}

fn check_route_and_workloads(s: &Value, inbound: SocketAddr) {
    assert!(s["config"]["seq"].as_u64() >= Some(1), "{}", s["config"]);
    let route = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "backend")
        .unwrap_or_else(|| panic!("no route: {s:#}"));
    assert_eq!(route["capability"], "hello:v1");
    let want =
        serde_json::json!([{"address": inbound.to_string(), "identity": BACKEND, "live": true}]);
    assert_eq!(route["endpoints"], want, "{route}");
    let w = |id: &str| {
        s["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["identity"] == id)
            .unwrap_or_else(|| panic!("no workload {id}: {s:#}"))
            .clone()
    };
    let (f, b) = (w(FRONTEND), w(BACKEND));
    assert_eq!(
        (f["service"].as_str(), f["tenant"].as_str()),
        (Some("frontend"), Some("demo"))
    );
    assert_eq!(
        (f["proxies"].as_u64(), f["endpoints"].as_u64()),
        (Some(1), Some(0)),
        "{f}"
    );
    assert!(f["last_report"].as_i64() > Some(0), "{f}");
    assert_eq!(
        (b["proxies"].as_u64(), b["endpoints"].as_u64()),
        (Some(1), Some(1)),
        "{b}"
    );
    assert_eq!(b["capabilities"], serde_json::json!(["hello:v1"]));
}
