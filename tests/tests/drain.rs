//! Drain on SIGTERM, as an SRE relies on it during a rollout: readiness turns
//! false, the listeners stop taking connections, requests already in flight
//! finish, and the process exits 0 as soon as they have (or at the drain
//! deadline, whichever is first). Both sidecars of the mesh, one at a time.

use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crank_tests::raw_http::RawConn;
use crank_tests::{curl, metric, wait_until, EchoApp, Mesh, MeshOptions, Proxy};

/// An echo app behind a two-sidecar mesh whose sidecars drain for `deadline`.
fn mesh_with_drain(deadline: &'static str) -> (EchoApp, Mesh) {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            drain: deadline,
            ..MeshOptions::default()
        },
    );
    (app, mesh)
}

fn inflight(p: &Proxy) -> f64 {
    metric(&p.metrics(), "crank_inflight_requests").unwrap_or(0.0)
}

/// A `/slow` request (1.5 s at the app) through the mesh, on its own thread.
fn slow_request(mesh: &Mesh, path: &str) -> JoinHandle<(u16, String)> {
    let url = mesh.port_url(path);
    std::thread::spawn(move || curl(&[&url]))
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

/// Polls `/ready` until it stops answering 200; returns that answer.
fn first_unready_answer(p: &Proxy) -> (u16, String) {
    let start = Instant::now();
    loop {
        let (status, body) = p.admin_get("/ready");
        if status != 200 {
            return (status, body);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/ready still 200 five seconds after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to `side` of the mesh while a /slow request is in flight there:
/// readiness, listener and exit checks shared by both sidecars.
fn drain_with_request_in_flight(mesh: &mut Mesh, app: &EchoApp, server_side: bool) {
    let slow = slow_request(mesh, "/slow/drain");
    let (proxy, listener) = if server_side {
        (&mut mesh.server, mesh.inbound)
    } else {
        (&mut mesh.client, mesh.port)
    };
    wait_until(
        "the /slow request to be in flight",
        Duration::from_secs(5),
        || inflight(proxy) >= 1.0,
    );
    assert!(
        !refuses_connections(listener),
        "the listener accepts before the drain"
    );

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    // Readiness goes first (what /ready says meanwhile is its own test below).
    first_unready_answer(proxy);

    wait_until(
        "the listener to refuse new connections",
        Duration::from_secs(2),
        || refuses_connections(listener),
    );
    assert!(
        !slow.is_finished(),
        "the checks above ran while the request was still in flight"
    );

    let (status, out) = slow.join().unwrap();
    assert_eq!(
        status, 200,
        "the in-flight request completes during the drain: {out}"
    );
    assert_eq!(app.last().map(|s| s.path), Some("/slow/drain".to_string()));

    let exit = proxy.wait_exit(Duration::from_secs(5));
    let waited = signalled.elapsed();
    let exit = exit.unwrap_or_else(|| {
        panic!("still running {waited:?} after SIGTERM (deadline 10s, nothing in flight)")
    });
    assert_eq!(exit.code(), Some(0), "a drained proxy exits 0");
    assert!(
        waited < Duration::from_secs(4),
        "exits as soon as nothing is in flight, not at the 10s deadline: {waited:?}"
    );
}

#[test]
fn sigterm_drains_the_server_sidecar_and_exits_0_when_idle() {
    let (app, mut mesh) = mesh_with_drain("10s");
    drain_with_request_in_flight(&mut mesh, &app, true);
    // The client sidecar is unaffected and says why the next request fails.
    assert_eq!(mesh.client.admin_get("/ready").0, 200);
    let (status, out) = curl(&[&mesh.port_url("/after")]);
    assert_eq!(status, 502, "{out}");
}

#[test]
fn sigterm_drains_the_client_sidecar_and_exits_0_when_idle() {
    let (app, mut mesh) = mesh_with_drain("10s");
    let http_proxy = mesh.http_proxy;
    drain_with_request_in_flight(&mut mesh, &app, false);
    assert!(
        refuses_connections(http_proxy),
        "the HTTP proxy listener is closed too"
    );
    assert_eq!(
        mesh.server.admin_get("/ready").0,
        200,
        "the server sidecar is unaffected"
    );
}

#[test]
fn an_idle_sidecar_exits_0_promptly_on_sigterm() {
    let (_app, mut mesh) = mesh_with_drain("10s");
    let (status, _) = curl(&[&mesh.port_url("/warm")]);
    assert_eq!(status, 200);
    let signalled = Instant::now();
    mesh.server.signal(libc::SIGTERM);
    let exit = mesh
        .server
        .wait_exit(Duration::from_secs(5))
        .expect("exits with nothing in flight");
    assert_eq!(exit.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
}

#[test]
fn ready_answers_503_draining_for_the_whole_drain() {
    // Probes and load balancers keep asking /ready during a rollout: the admin
    // listener must keep answering, and say why, until the process exits.
    let (_app, mesh) = mesh_with_drain("10s");
    let _upload = endless_upload(&mesh);
    mesh.server.signal(libc::SIGTERM);
    let mut answers = vec![first_unready_answer(&mesh.server)];
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        std::thread::sleep(Duration::from_millis(50));
        answers.push(mesh.server.admin_get("/ready"));
    }
    let bad: Vec<_> = answers
        .iter()
        .filter(|(s, b)| *s != 503 || !b.contains("draining"))
        .collect();
    assert!(
        bad.is_empty(),
        "/ready must answer 503 \"not ready: draining\" throughout the drain; {} of {} answers were {:?} \
         (status 0: the admin listener refused the connection)",
        bad.len(),
        answers.len(),
        bad.first()
    );
    let m = mesh.server.metrics();
    assert_eq!(metric(&m, "crank_ready"), Some(0.0), "{m}");
}

/// Starts an upload to /slow through the mesh that never finishes its body,
/// so the request stays in flight at the server sidecar for as long as the
/// connection lives. Returns the connection (keep it open).
fn endless_upload(mesh: &Mesh) -> RawConn {
    let mut c = RawConn::connect(mesh.port);
    c.send(b"POST /slow/upload HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    wait_until(
        "the upload to be in flight at the server sidecar",
        Duration::from_secs(5),
        || inflight(&mesh.server) >= 1.0,
    );
    c
}

#[test]
fn a_request_outliving_the_deadline_is_cut_and_the_sidecar_exits_0_at_the_deadline() {
    let (_app, mut mesh) = mesh_with_drain("1s");
    let _upload = endless_upload(&mesh);
    let signalled = Instant::now();
    mesh.server.signal(libc::SIGTERM);
    let exit = mesh.server.wait_exit(Duration::from_secs(5));
    let waited = signalled.elapsed();
    let exit =
        exit.unwrap_or_else(|| panic!("still running {waited:?} after SIGTERM with a 1s deadline"));
    assert_eq!(
        exit.code(),
        Some(0),
        "reaching the deadline is still a clean exit"
    );
    assert!(
        waited >= Duration::from_millis(950),
        "waited for the in-flight request until the deadline: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(2500),
        "exits at about the 1s deadline: {waited:?}"
    );
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let (_app, mut mesh) = mesh_with_drain("10s");
    let _upload = endless_upload(&mesh);
    mesh.server.signal(libc::SIGTERM);
    first_unready_answer(&mesh.server);
    assert!(
        mesh.server.wait_exit(Duration::from_millis(300)).is_none(),
        "the first SIGTERM waits for the upload"
    );
    let second = Instant::now();
    mesh.server.signal(libc::SIGTERM);
    let exit = mesh
        .server
        .wait_exit(Duration::from_secs(3))
        .expect("a second SIGTERM ends the drain");
    assert_eq!(exit.code(), Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(1),
        "{:?}",
        second.elapsed()
    );
}
