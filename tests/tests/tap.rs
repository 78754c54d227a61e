//! Live traffic end to end: `crankctl tap` streams matching requests from a
//! real sidecar's admin port, a stalled tap client never slows requests,
//! and `crankctl top` shows rates computed from the sidecars' metrics.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crank_tests::load::Load;
use crank_tests::raw_http::exchange;
use crank_tests::{bin, metric, wait_until, EchoApp, FlakyApp, Mesh, MeshOptions};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn tap_streams_only_the_requests_asked_for() {
    let app = FlakyApp::start("only");
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let admin = mesh.client.admin.to_string();
    let mut tap = Command::new(bin("crankctl"))
        .args([
            "tap", "--proxy", &admin, "--status", "5xx", "--limit", "3", "-o", "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tap.stdout.take().unwrap()).lines();
    let send = |path: &str| {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: backend\r\ntraceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n"
        );
        exchange(mesh.port, req.as_bytes(), Duration::from_secs(10))
            .0
            .first()
            .map_or(0, |r| r.status)
    };
    // Healthy requests are not 5xx: the tap shows none of them.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        assert_eq!(send("/ok?secret=1"), 200);
    }
    app.fail_with(502);
    let sender = std::thread::spawn({
        let port = mesh.port;
        move || {
            for _ in 0..20 {
                let req = format!(
                    "GET /bad?secret=1 HTTP/1.1\r\nHost: backend\r\ntraceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n"
                );
                exchange(port, req.as_bytes(), Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let mut got = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("a tap line").unwrap();
        got.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    let status = tap.wait().unwrap();
    assert!(status.success(), "crankctl tap exits after --limit");
    sender.join().unwrap();
    for ev in &got {
        let s = ev["status"].as_u64().unwrap();
        assert!((500..600).contains(&s), "{ev}");
        assert_eq!(ev["path"], "/bad", "no query string: {ev}");
        assert_eq!(ev["direction"], "outbound");
        assert_eq!(ev["route"], "backend");
        assert_eq!(ev["method"], "GET");
        assert_eq!(ev["trace_id"], TRACE);
        assert_eq!(ev["proxy"], admin.as_str());
        assert!(
            ev["source"].as_str().unwrap().ends_with("/svc/frontend"),
            "{ev}"
        );
        assert!(ev["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(ev.get("headers").is_none() && ev.get("body").is_none());
    }
    // A refused tap names the problem.
    let out = Command::new(bin("crankctl"))
        .args(["tap", "--proxy", &admin, "--status", "9xx"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status=9xx"), "{err}");
}

#[test]
fn a_stalled_tap_client_never_slows_requests() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let admin = mesh.client.admin;
    // A tap client that never reads, and takes one event a second: the
    // rest are dropped on the admin thread (that a full backlog never
    // blocks `publish` is the unit test in proxy/src/tap.rs).
    let mut stalled = TcpStream::connect(admin).unwrap();
    stalled
        .write_all(b"GET /tap?max_rps=1 HTTP/1.1\r\nHost: admin\r\n\r\n")
        .unwrap();
    let load = Load::start(mesh.port, 2);
    load.wait_for(3000);
    let (ok, failed, first) = load.stop();
    assert_eq!(failed, 0, "{ok} ok; {first:?}");
    // What it did not take is counted.
    wait_until(
        "dropped tap events are counted",
        Duration::from_secs(5),
        || metric(&mesh.client.metrics(), "crank_tap_events_dropped_total").unwrap_or(0.0) > 0.0,
    );
    drop(stalled);
}

#[test]
fn top_shows_rates_per_route_across_sidecars() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let load = Load::start(mesh.port, 2);
    load.wait_for(100);
    let out = Command::new(bin("crankctl"))
        .args([
            "top",
            "--proxy",
            &mesh.client.admin.to_string(),
            "--proxy",
            &mesh.server.admin.to_string(),
            "--interval",
            "1s",
            "--iterations",
            "2",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let (_, failed, _) = load.stop();
    assert_eq!(failed, 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a table")).unwrap();
    let rows = last.as_array().unwrap();
    let row = |dir: &str, route: &str| {
        rows.iter()
            .find(|r| r["direction"] == dir && r["route"] == route)
            .unwrap_or_else(|| panic!("no {dir} {route} row: {text}"))
    };
    for r in [row("outbound", "backend"), row("inbound", "app")] {
        assert!(r["rps"].as_f64().unwrap() > 10.0, "{r}");
        assert_eq!(r["success"].as_f64().unwrap(), 1.0, "{r}");
        assert!(r["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
    }
}
