//! Mutual TLS between sidecars, as a security engineer relies on it: the
//! inbound listener serves mesh peers only (plaintext, missing, foreign,
//! expired, not-yet-valid, identity-less certificates and TLS 1.2 are all
//! refused before the app sees anything), the client sidecar refuses a peer
//! that does not prove the route's identity, and every refusal is counted in
//! `crank_tls_handshake_failures_total` and logged with its reason.

use std::time::{Duration, Instant};

use crank_certs::{Identity, LeafRequest};
use crank_tests::pki::Leaf;
use crank_tests::sidecar::{client_sidecar, curl_mtls, leaf_without_identity, server_sidecar};
use crank_tests::{curl, header, metric, EchoApp, Mesh, MeshOptions, Pki, Proxy};
use time::OffsetDateTime;

/// The server sidecar's DNS identity in every mesh here.
const SERVER_DNS: &str = "backend.demo.crank.local";
const CALLER: &str = "spiffe://crank.local/tenant/demo/svc/frontend";

fn failures(p: &Proxy, direction: &str, reason: &str) -> f64 {
    let series = format!(
        "crank_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
    );
    metric(&p.metrics(), &series).unwrap_or(0.0)
}

/// Waits until the proxy's log has a line with `"reason":"<reason>"`.
fn wait_for_logged_reason(p: &Proxy, reason: &str) {
    let needle = format!("\"reason\":\"{reason}\"");
    let start = Instant::now();
    while !p.log_text().contains(&needle) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no log line with {needle}:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The proxy's log for a failure message, once its writer has caught up.
fn settled_log(p: &Proxy) -> String {
    std::thread::sleep(Duration::from_millis(300));
    p.log_text()
}

/// A leaf for `frontend.demo` from `pki` with explicit validity bounds.
fn frontend_leaf_valid(pki: &Pki, name: &str, from: OffsetDateTime, until: OffsetDateTime) -> Leaf {
    let id = Identity::new("frontend", "demo", "crank.local").unwrap();
    let mut req = LeafRequest::new(id, Duration::from_secs(3600));
    req.not_before = Some(from);
    req.not_after = Some(until);
    pki.leaf_with(&req, name)
}

fn expired_frontend_leaf(pki: &Pki) -> Leaf {
    let now = OffsetDateTime::now_utc();
    frontend_leaf_valid(
        pki,
        "expired-frontend.demo",
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    )
}

// ------------------------------------------------------------- inbound --

#[test]
fn a_mesh_client_cert_is_accepted_and_its_identity_reaches_the_app() {
    // The control for every refusal below: the same curl, with a good cert, gets through.
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let good = mesh.pki.leaf("frontend", "demo");
    let r = curl_mtls(
        &mesh.pki,
        mesh.inbound,
        SERVER_DNS,
        Some(&good),
        &[],
        "/direct",
    );
    assert_eq!((r.exit, r.status), (0, 200), "{r:?}");
    let seen = app.last().expect("the app saw the request");
    assert_eq!(seen.path, "/direct");
    assert_eq!(seen.header("x-crank-client-id"), Some(CALLER));
    let m = mesh.server.metrics();
    assert!(
        !m.contains("crank_tls_handshake_failures_total{"),
        "no refusal counted for a good peer:\n{m}"
    );
}

#[test]
fn plaintext_on_the_mtls_port_gets_400_mtls_required() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let (status, out) = curl(&[&format!("http://{}/plain", mesh.inbound)]);
    assert_eq!(status, 400, "{out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("mtls-required"),
        "{out}"
    );
    assert!(
        out.contains("mutual TLS"),
        "the body says what the port needs: {out}"
    );
    assert_eq!(
        header(&out, "x-crank-error-origin"),
        Some("inbound"),
        "{out}"
    );
    assert!(
        header(&out, "x-crank-error-sidecar").is_some_and(|s| s.ends_with("/svc/backend")),
        "{out}"
    );
    assert_eq!(failures(&mesh.server, "inbound", "plaintext"), 1.0);
    assert_eq!(
        app.count(),
        0,
        "a plaintext request must never reach the app"
    );
    wait_for_logged_reason(&mesh.server, "plaintext");
}

#[test]
fn a_peer_without_a_client_cert_gets_403_on_every_request() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    for (i, version) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let r = curl_mtls(
            &mesh.pki,
            mesh.inbound,
            SERVER_DNS,
            None,
            &[version],
            "/anonymous",
        );
        assert_eq!(r.status, 403, "{version}: {r:?}");
        assert_eq!(
            header(&r.out, "x-crank-error"),
            Some("client-cert-required"),
            "{version}: {r:?}"
        );
        assert!(
            r.out.contains("client certificate"),
            "the body says what to do: {r:?}"
        );
        assert_eq!(
            failures(&mesh.server, "inbound", "no-client-cert"),
            (i + 1) as f64
        );
    }
    assert_eq!(
        app.count(),
        0,
        "a peer without a certificate must never reach the app"
    );
    wait_for_logged_reason(&mesh.server, "no-client-cert");
}

#[test]
fn a_mesh_signed_cert_without_a_crank_identity_gets_403() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let legacy = leaf_without_identity(&mesh.pki, "legacy");
    let r = curl_mtls(
        &mesh.pki,
        mesh.inbound,
        SERVER_DNS,
        Some(&legacy),
        &[],
        "/legacy",
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        header(&r.out, "x-crank-error"),
        Some("peer-identity-invalid"),
        "{r:?}"
    );
    assert_eq!(failures(&mesh.server, "inbound", "no-identity"), 1.0);
    assert_eq!(app.count(), 0);
    wait_for_logged_reason(&mesh.server, "no-identity");
}

#[test]
fn bad_client_certs_and_old_tls_are_refused_at_the_handshake() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let pki = &mesh.pki;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let good = pki.leaf("frontend", "demo");
    let cases: Vec<(&str, Leaf, &[&str])> = vec![
        ("unknown-ca", pki.foreign_leaf("frontend", "demo"), &[]),
        ("expired", expired_frontend_leaf(pki), &[]),
        (
            "not-yet-valid",
            frontend_leaf_valid(pki, "future-frontend.demo", now + day, now + day * 2),
            &[],
        ),
        ("tls-version", good, &["--tls-max", "1.2"]),
    ];
    let mut wrong = Vec::new();
    for (reason, leaf, extra) in &cases {
        let before = failures(&mesh.server, "inbound", reason);
        let r = curl_mtls(
            pki,
            mesh.inbound,
            SERVER_DNS,
            Some(leaf),
            extra,
            &format!("/{reason}"),
        );
        let after = failures(&mesh.server, "inbound", reason);
        if r.exit == 0 || r.status != 0 {
            wrong.push(format!(
                "{reason}: the handshake should fail, curl got {r:?}"
            ));
        }
        if after != before + 1.0 {
            wrong.push(format!("{reason}: counted {before} -> {after}, want +1"));
        }
        let logged = format!("\"reason\":\"{reason}\"");
        let start = Instant::now();
        while !mesh.server.log_text().contains(&logged) && start.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(25));
        }
        if !mesh.server.log_text().contains(&logged) {
            wrong.push(format!("{reason}: not logged"));
        }
    }
    assert_eq!(app.count(), 0, "no refused peer may reach the app");
    assert!(
        wrong.is_empty(),
        "{}\nmetrics:\n{}\nserver log:\n{}",
        wrong.join("\n"),
        mesh.server.metrics(),
        mesh.server.log_text()
    );
}

// ------------------------------------------------------------ outbound --

#[test]
fn a_peer_not_proving_the_routes_identity_gets_502_identity_mismatch() {
    let app = EchoApp::start();
    let opts = MeshOptions {
        expected_server_identity: "payments.demo.crank.local".into(),
        ..MeshOptions::default()
    };
    let mesh = Mesh::start(app.addr, opts);
    let (status, out) = curl(&[&mesh.port_url("/wrong-peer")]);
    assert_eq!(status, 502, "{out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("tls-identity-mismatch"),
        "{out}"
    );
    assert!(out.contains("identity"), "the body explains: {out}");
    assert!(
        out.contains("expected spiffe://crank.local/tenant/demo/svc/payments, presented spiffe://crank.local/tenant/demo/svc/backend"),
        "the body names both identities: {out}"
    );
    assert_eq!(
        failures(&mesh.client, "outbound", "identity-mismatch"),
        1.0,
        "{}",
        mesh.client.metrics()
    );
    assert_eq!(
        app.count(),
        0,
        "nothing is sent to a peer that failed to prove its identity"
    );
    wait_for_logged_reason(&mesh.client, "tls-identity-mismatch");
}

#[test]
fn a_peer_cert_from_another_ca_gets_502_upstream_tls_failed() {
    let app = EchoApp::start();
    let pki = Pki::new();
    let server = server_sidecar(
        &pki,
        "server",
        &pki.foreign_leaf("backend", "demo"),
        app.addr,
        "5s",
    )
    .unwrap();
    let client = client_sidecar(
        &pki,
        "client",
        &pki.leaf("frontend", "demo"),
        server.listen,
        SERVER_DNS,
        "5s",
    )
    .unwrap();
    let (status, out) = curl(&[&format!("http://{}/impostor", client.listen)]);
    assert_eq!(status, 502, "{out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("upstream-tls-failed"),
        "{out}"
    );
    assert_eq!(
        failures(&client.proxy, "outbound", "tls-failed"),
        1.0,
        "{}",
        client.proxy.metrics()
    );
    assert_eq!(
        failures(&client.proxy, "outbound", "identity-mismatch"),
        0.0
    );
    assert_eq!(app.count(), 0);
    wait_for_logged_reason(&client.proxy, "upstream-tls-failed");
}

#[test]
fn a_client_sidecar_with_an_expired_cert_answers_own_cert_expired_and_peers_refuse_it() {
    let app = EchoApp::start();
    let pki = Pki::new();
    let server =
        server_sidecar(&pki, "server", &pki.leaf("backend", "demo"), app.addr, "5s").unwrap();
    let expired = expired_frontend_leaf(&pki);
    let client = client_sidecar(&pki, "client", &expired, server.listen, SERVER_DNS, "5s").unwrap();
    // It runs, but says it is not ready, and why.
    crank_tests::wait_until("/ready says cert-expired", Duration::from_secs(10), || {
        client.proxy.admin_get("/ready").1.contains("cert-expired")
    });
    assert_eq!(client.proxy.admin_get("/ready").0, 503);
    // Its own calls are answered by it with the local cause: every peer
    // would refuse the certificate, so no healthy peer is blamed.
    let (status, out) = curl(&[&format!("http://{}/stale", client.listen)]);
    assert_eq!(
        status,
        503,
        "{out}\nclient log:\n{}",
        settled_log(&client.proxy)
    );
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("own-cert-expired"),
        "{out}"
    );
    assert_eq!(
        header(&out, "x-crank-error-origin"),
        Some("outbound"),
        "{out}"
    );
    assert_eq!(
        failures(&client.proxy, "outbound", "tls-failed"),
        0.0,
        "nothing was sent: {}",
        client.proxy.metrics()
    );
    // A client that does present the expired certificate is refused by the
    // server sidecar, and nothing reaches the app.
    let _ = curl(&[
        "-sk",
        "--cert",
        expired.cert.to_str().unwrap(),
        "--key",
        expired.key.to_str().unwrap(),
        &format!("https://{}/stale", server.listen),
    ]);
    assert_eq!(
        failures(&server.proxy, "inbound", "expired"),
        1.0,
        "{}",
        server.proxy.metrics()
    );
    assert_eq!(app.count(), 0);
    wait_for_logged_reason(&client.proxy, "own-cert-expired");
}

#[test]
fn a_client_sidecar_with_a_foreign_cert_gets_502_upstream_tls_failed() {
    let app = EchoApp::start();
    let other = Pki::new();
    let opts = MeshOptions {
        client_leaf: Some(other.leaf("frontend", "demo")),
        ..MeshOptions::default()
    };
    let mesh = Mesh::start(app.addr, opts);
    let (status, out) = curl(&[&mesh.port_url("/foreign")]);
    assert_eq!(
        status,
        502,
        "{out}\nclient log:\n{}",
        settled_log(&mesh.client)
    );
    // The server sidecar refused the certificate, and nothing reached the app.
    assert_eq!(
        failures(&mesh.server, "inbound", "unknown-ca"),
        1.0,
        "{}",
        mesh.server.metrics()
    );
    assert_eq!(app.count(), 0);
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("upstream-tls-failed"),
        "{out}\nclient log:\n{}",
        settled_log(&mesh.client)
    );
    assert_eq!(
        failures(&mesh.client, "outbound", "tls-failed"),
        1.0,
        "{}",
        mesh.client.metrics()
    );
}
