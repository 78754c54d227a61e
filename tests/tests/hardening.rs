//! Hardening found by trying the mesh as a new user and drilling it: one
//! caller's malformed requests must not eject a healthy endpoint, slow
//! clients must not exhaust a sidecar, errors must not lie about the
//! connection, short, host-less and pipelined requests get answers, a 501
//! from the app does not eject, and every answer names which sidecar made it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crank_tests::app::EchoApp;
use crank_tests::load::Load;
use crank_tests::raw_http::{exchange, RawConn};
use crank_tests::{free_port, metric, wait_until, FlakyApp, Mesh, MeshOptions};

fn ejections(mesh: &Mesh) -> f64 {
    let m = mesh.client.metrics();
    m.lines()
        .filter(|l| l.starts_with("crank_circuit_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn bad_request(addr: SocketAddr, bytes: &[u8]) -> u16 {
    let (responses, _) = exchange(addr, bytes, Duration::from_secs(10));
    let r = responses.first().expect("an answer to a malformed request");
    assert!(
        r.header("x-crank-error").is_some(),
        "every refusal names its reason: {}",
        r.head
    );
    r.status
}

#[test]
fn one_callers_malformed_requests_do_not_eject_a_healthy_endpoint() {
    let app = EchoApp::start();
    // The client's edge limit is raised past what the peer's HTTP/2 server
    // takes, so oversized heads reach the peer and are refused there: the
    // outbound side must not hold that against the endpoint either.
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: "limits: {max_request_header_bytes: 1048576}\n".into(),
            ..Default::default()
        },
    );
    let edge = Mesh::start(app.addr, MeshOptions::default());
    let load = Load::start(mesh.port, 2);
    let load2 = Load::start(edge.port, 2);
    load.wait_for(50);
    load2.wait_for(50);
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: backend\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let list =
        "POST /cl HTTP/1.1\r\nHost: backend\r\nConnection: close\r\nContent-Length: 5, 5\r\n\r\nhello";
    for _ in 0..20 {
        // At the edge (default limits): 431 and 400, named.
        assert_eq!(bad_request(edge.port, big.as_bytes()), 431);
        assert_eq!(bad_request(edge.port, list.as_bytes()), 400);
        // Past the edge: the peer refuses; still a 4xx for this request only.
        let (responses, _) = exchange(mesh.port, big.as_bytes(), Duration::from_secs(10));
        let status = responses.first().map_or(0, |r| r.status);
        assert!((400..500).contains(&status), "{responses:?}");
        assert_eq!(bad_request(mesh.port, list.as_bytes()), 400);
    }
    // Good traffic kept flowing the whole time.
    let before = load.ok();
    load.wait_for(before + 50);
    let (ok, failed, first) = load.stop();
    let (ok2, failed2, first2) = load2.stop();
    assert_eq!(failed, 0, "{ok} ok; failures: {first:?}");
    assert_eq!(failed2, 0, "{ok2} ok; failures: {first2:?}");
    assert_eq!(ejections(&mesh), 0.0, "{}", mesh.client.metrics());
    assert_eq!(ejections(&edge), 0.0, "{}", edge.client.metrics());
    let m = mesh.client.metrics();
    assert!(
        !m.contains("crank_retries_total{"),
        "a request the peer refused as malformed is never retried: {m}"
    );
}

#[test]
fn a_501_from_the_app_does_not_eject_but_a_502_does() {
    let app = FlakyApp::start("only");
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    app.fail_with(501);
    for _ in 0..10 {
        let (responses, _) = exchange(
            mesh.port,
            b"DELETE /x HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        );
        assert_eq!(responses[0].status, 501, "{responses:?}");
    }
    assert_eq!(ejections(&mesh), 0.0);
    app.fail_with(502);
    for _ in 0..5 {
        exchange(
            mesh.port,
            b"GET /x HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        );
    }
    assert_eq!(ejections(&mesh), 1.0, "{}", mesh.client.metrics());
}

#[test]
fn proxy_errors_say_connection_close_and_name_their_sidecar() {
    // The peer sidecar's app is down: the peer's inbound side answers 502,
    // and the caller sees which sidecar said it.
    let dead_app: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut mesh = Mesh::start(dead_app, MeshOptions::default());
    let mut c = RawConn::connect(mesh.port);
    c.send(b"GET /a HTTP/1.1\r\nHost: backend\r\n\r\n");
    let r = c
        .read_response(Duration::from_secs(10))
        .expect("a response");
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.header("x-crank-error"), Some("upstream-connect-failed"));
    assert_eq!(
        r.header("x-crank-error-origin"),
        Some("inbound"),
        "{}",
        r.head
    );
    assert!(
        r.header("x-crank-error-sidecar")
            .is_some_and(|s| s.ends_with("/svc/backend")),
        "{}",
        r.head
    );
    // The connection is still usable, or it says it is not.
    if r.header("connection") == Some("close") {
        assert!(c.read_until_closed(Duration::from_secs(5)));
    } else {
        c.send(b"GET /b HTTP/1.1\r\nHost: backend\r\n\r\n");
        assert!(c.read_response(Duration::from_secs(10)).is_some());
    }

    // The peer sidecar is gone: the caller's own sidecar answers, and
    // says the connection closes.
    mesh.server.signal(libc::SIGKILL);
    mesh.server.wait_exit(Duration::from_secs(5));
    let mut c = RawConn::connect(mesh.port);
    c.send(b"GET /c HTTP/1.1\r\nHost: backend\r\n\r\n");
    let r = c
        .read_response(Duration::from_secs(10))
        .expect("a response");
    // 502 while the endpoint is still tried, 503 once the failures (the
    // first part's 502s and their retries) ejected it: both are the
    // caller's own sidecar answering.
    assert!(matches!(r.status, 502 | 503), "{}", r.head);
    assert!(
        matches!(
            r.header("x-crank-error"),
            Some("upstream-connect-failed" | "circuit-open")
        ),
        "{}",
        r.head
    );
    assert_eq!(
        r.header("x-crank-error-origin"),
        Some("outbound"),
        "{}",
        r.head
    );
    assert!(
        r.header("x-crank-error-sidecar")
            .is_some_and(|s| s.ends_with("/svc/frontend")),
        "{}",
        r.head
    );
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(c.read_until_closed(Duration::from_secs(5)));
    // The access log says who answered (its writer is batched: wait).
    wait_until(
        "both error origins in the access log",
        Duration::from_secs(5),
        || {
            let log = mesh.client.log_text();
            log.contains("\"error_origin\":\"outbound\"")
                && log.contains("\"error_origin\":\"peer\"")
        },
    );
}

#[test]
fn short_hostless_garbage_and_pipelined_requests_get_answers() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    // 18 bytes: shorter than the h2 preface the sniff used to wait for.
    let started = Instant::now();
    let (responses, _) = exchange(
        mesh.http_proxy,
        b"GET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = responses.first().expect("an answer to a short request");
    assert_eq!(r.status, 404, "{}", r.head);
    assert_eq!(r.header("x-crank-error"), Some("no-route"));
    // HTTP/1.1 without Host: 400 at the edge, not a 502 from upstream.
    let (responses, _) = exchange(
        mesh.port,
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(10),
    );
    let r = &responses[0];
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.header("x-crank-error"), Some("bad-request"));
    assert!(r.body.contains("Host"), "{}", r.body);
    // A head the parser cannot take: Pingora's own 400, now named.
    let (responses, closed) = exchange(
        mesh.port,
        b"GET / HTTP/1.1\r\nHost: backend\r\nBad Header\r\n\r\n",
        Duration::from_secs(10),
    );
    let r = &responses[0];
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.header("x-crank-error"), Some("bad-request"), "{}", r.head);
    assert_eq!(r.header("x-crank-error-origin"), Some("outbound"));
    assert!(r.header("server").is_none(), "{}", r.head);
    assert!(closed);
    // Pipelined: three requests in one write, three answers in order.
    let (responses, _) = exchange(
        mesh.port,
        b"GET /one HTTP/1.1\r\nHost: backend\r\n\r\nGET /two HTTP/1.1\r\nHost: backend\r\n\r\nGET /three HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let paths: Vec<_> = responses
        .iter()
        .map(|r| (r.status, r.body.clone()))
        .collect();
    assert_eq!(responses.len(), 3, "{paths:?}");
    for (r, path) in responses.iter().zip(["/one", "/two", "/three"]) {
        assert_eq!(r.status, 200);
        assert!(r.body.contains(path), "{paths:?}");
    }
}

/// Opens `n` connections to `addr`, each sending the start of a request
/// head and nothing more.
fn open_slow(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
            s.write_all(b"GET /slow HTTP/1.1\r\nHost: backend\r\n")
                .ok()?;
            Some(s)
        })
        .collect()
}

/// Whether the proxy closed `s` (a read returns 0 or an error).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(1))).ok();
    let mut b = [0u8; 512];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => closed_by_peer(s),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn slow_clients_are_cut_and_capped_while_traffic_flows_and_memory_returns() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: "limits: {request_head_timeout: 2s}\n".into(),
            ..Default::default()
        },
    );
    let load = Load::start(mesh.port, 2);
    load.wait_for(100);
    let pid = mesh.client.pid();
    let baseline = rss_kib(pid);

    // Rounds of slowloris: 2,000 connections trickling header lines.
    let mut peak = baseline;
    for round in 0..3 {
        let mut slow = open_slow(mesh.port, 2000);
        assert!(slow.len() >= 1900, "round {round}: {} opened", slow.len());
        let opened = Instant::now();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            for s in slow.iter_mut() {
                let _ = s.write_all(b"X-Slow: 1\r\n");
            }
        }
        peak = peak.max(rss_kib(pid));
        // The head deadline (2s) closes every one of them.
        wait_until(
            "the proxy closes every slow connection",
            Duration::from_secs(15),
            || slow.iter_mut().all(closed_by_peer),
        );
        assert!(opened.elapsed() < Duration::from_secs(12));
    }
    let m = mesh.client.metrics();
    assert!(
        metric(
            &m,
            r#"crank_request_head_timeouts_total{direction="outbound"}"#
        )
        .unwrap_or(0.0)
            >= 5700.0,
        "{m}"
    );

    // Good traffic kept flowing through all of it.
    let before = load.ok();
    load.wait_for(before + 100);
    let (ok, failed, first) = load.stop();
    assert_eq!(failed, 0, "{ok} ok; failures: {first:?}");

    // Memory goes back: within 12 MiB of the baseline after the trimmer ran.
    let mut after = rss_kib(pid);
    wait_until(
        "RSS returns near its baseline",
        Duration::from_secs(20),
        || {
            after = rss_kib(pid);
            after <= baseline + 12 * 1024
        },
    );
    eprintln!("RSS KiB: baseline {baseline}, peak {peak}, after {after}");
}

#[test]
fn past_the_connection_cap_new_connections_are_closed_at_once() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: "limits: {outbound_max_connections: 200}\n".into(),
            ..Default::default()
        },
    );
    let mut held: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(mesh.port).unwrap())
        .collect();
    wait_until("200 connections open", Duration::from_secs(5), || {
        metric(
            &mesh.client.metrics(),
            r#"crank_open_connections{direction="outbound"}"#,
        ) == Some(200.0)
    });
    let mut extra: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(mesh.port).unwrap())
        .collect();
    wait_until(
        "every connection past the cap is closed",
        Duration::from_secs(5),
        || extra.iter_mut().all(closed_by_peer),
    );
    let m = mesh.client.metrics();
    assert_eq!(
        metric(
            &m,
            r#"crank_connections_refused_total{direction="outbound",reason="limit"}"#
        ),
        Some(20.0),
        "{m}"
    );
    // The held ones still work, and a freed slot takes a new connection.
    let mut c = held.pop().unwrap();
    c.write_all(b"GET /held HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(c);
    wait_until("a slot is free", Duration::from_secs(5), || {
        metric(
            &mesh.client.metrics(),
            r#"crank_open_connections{direction="outbound"}"#,
        ) == Some(199.0)
    });
    let (responses, _) = exchange(
        mesh.port,
        b"GET /new HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(responses.first().map(|r| r.status), Some(200));
}
