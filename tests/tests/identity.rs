//! Identity end to end: a real `crank-control` as the CA, sidecars that
//! enroll with one-time tokens, renewal (also while the control plane is
//! down), every enrollment refusal, revocation, and root and intermediate
//! rotation under constant load with zero failed requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crank_tests::app::EchoApp;
use crank_tests::control::{serial_of, ControlOptions, ControlPlane, EnrolledMesh};
use crank_tests::load::Load;
use crank_tests::{curl, header, metric, wait_until};

// ---- the workload API with a real client (curl) ----

/// POSTs JSON to the control plane's workload API; (status, body).
fn post(
    cp: &ControlPlane,
    path: &str,
    body: &serde_json::Value,
    client: Option<(&Path, &Path)>,
) -> (u16, serde_json::Value) {
    let file = cp.path().join("req.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let url = format!(
        "https://control.crank-system.crank.local:{}{path}",
        cp.listen.port()
    );
    let resolve = format!(
        "control.crank-system.crank.local:{}:127.0.0.1",
        cp.listen.port()
    );
    let bundle = cp.bootstrap_bundle();
    let data = format!("@{}", file.display());
    let mut args = vec![
        "--cacert",
        bundle.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
    ];
    let (c, k);
    if let Some((cert, key)) = client {
        c = cert.display().to_string();
        k = key.display().to_string();
        args.extend(["--cert", &c, "--key", &k]);
    }
    args.push(&url);
    let (status, text) = curl(&args);
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or_default())
}

fn enroll_body(token: &str, csr: &str) -> serde_json::Value {
    serde_json::json!({"token": token, "csr": csr, "instance": "test-1"})
}

fn id(service: &str) -> crank_certs::Identity {
    crank_certs::Identity::new(service, "demo", "crank.local").unwrap()
}

/// The CSR with the last byte of its signature changed: still DER, but
/// the signature no longer verifies.
fn tampered(csr_pem: &str) -> String {
    let b64: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut der = b64_decode(&b64);
    let last = der.len() - 1;
    der[last] ^= 0x01;
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        b64_encode(&der)
    )
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | B64.iter().position(|x| *x == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn b64_encode(b: &[u8]) -> String {
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().fold(0u32, |a, x| (a << 8) | *x as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn assert_refused(what: &str, got: (u16, serde_json::Value), status: u16, code: &str, hint: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"], code, "{what}: {}", got.1);
    let msg = got.1["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(hint),
        "{what}: message {msg:?} should say {hint:?}"
    );
}

#[test]
fn every_enrollment_refusal_names_the_reason_and_the_fix() {
    let cp = ControlPlane::start(ControlOptions::default());
    let (key, csr) = crank_certs::new_key_and_csr(&id("web")).unwrap();
    let token = cp.token("web", "demo");

    assert_refused(
        "unknown token",
        post(
            &cp,
            "/v1/identity/enroll",
            &enroll_body("crank-jt-0000", &csr),
            None,
        ),
        403,
        "token-unknown",
        "crankctl token create",
    );
    assert_refused(
        "malformed CSR",
        post(
            &cp,
            "/v1/identity/enroll",
            &enroll_body(&token, "hello"),
            None,
        ),
        400,
        "csr-malformed",
        "CSR",
    );
    assert_refused(
        "bad signature",
        post(
            &cp,
            "/v1/identity/enroll",
            &enroll_body(&token, &tampered(&csr)),
            None,
        ),
        400,
        "csr-bad-signature",
        "signature",
    );
    let (_, api_csr) = crank_certs::new_key_and_csr(&id("api")).unwrap();
    assert_refused(
        "identity not granted",
        post(
            &cp,
            "/v1/identity/enroll",
            &enroll_body(&token, &api_csr),
            None,
        ),
        403,
        "identity-not-granted",
        "spiffe://crank.local/tenant/demo/svc/web",
    );

    // None of the refusals used the token up.
    let (status, ok) = post(&cp, "/v1/identity/enroll", &enroll_body(&token, &csr), None);
    assert_eq!(status, 200, "{ok}");
    let chain = ok["chain"].as_str().unwrap();
    let der = crank_certs::pem::certs_from_pem(chain.as_bytes()).unwrap();
    assert_eq!(der.len(), 2, "leaf and intermediate");
    assert_eq!(crank_certs::identity_from_der(&der[0]).unwrap(), id("web"));
    assert_eq!(ok["bundle"]["version"], 1);
    assert_refused(
        "reused token",
        post(&cp, "/v1/identity/enroll", &enroll_body(&token, &csr), None),
        403,
        "token-reused",
        "one-time",
    );

    let short = cp.ctl_ok(&[
        "token",
        "create",
        "--service",
        "web",
        "--tenant",
        "demo",
        "--ttl",
        "1s",
    ]);
    std::thread::sleep(Duration::from_millis(2100));
    assert_refused(
        "expired token",
        post(
            &cp,
            "/v1/identity/enroll",
            &enroll_body(short.trim(), &csr),
            None,
        ),
        403,
        "token-expired",
        "expired",
    );

    // Renewal needs the current certificate, for the same identity.
    let renew = serde_json::json!({"csr": csr, "instance": "test-1"});
    assert_refused(
        "renew without a cert",
        post(&cp, "/v1/identity/renew", &renew, None),
        401,
        "cert-required",
        "client certificate",
    );
    let (cert_file, key_file) = (cp.path().join("web.crt"), cp.path().join("web.key"));
    std::fs::write(&cert_file, chain).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let client = Some((cert_file.as_path(), key_file.as_path()));
    let other = serde_json::json!({"csr": api_csr, "instance": "test-1"});
    assert_refused(
        "renew for another identity",
        post(&cp, "/v1/identity/renew", &other, client),
        403,
        "identity-mismatch",
        "spiffe://crank.local/tenant/demo/svc/web",
    );
    let (status, renewed) = post(&cp, "/v1/identity/renew", &renew, client);
    assert_eq!(status, 200, "{renewed}");
    assert_ne!(renewed["serial"], ok["serial"]);

    // A revoked certificate cannot renew.
    cp.ctl_ok(&["cert", "revoke", ok["serial"].as_str().unwrap()]);
    assert_refused(
        "renew with a revoked cert",
        post(&cp, "/v1/identity/renew", &renew, client),
        403,
        "cert-revoked",
        "new join token",
    );

    // Every refusal is counted by reason.
    let metrics = cp.ctl_ok(&["ca", "status", "--output", "json"]);
    assert!(metrics.contains("\"revoked_serials\": 1"), "{metrics}");
    let list = cp.ctl_ok(&["cert", "list"]);
    assert!(
        list.contains("revoked") && list.contains("web.demo.crank.local"),
        "{list}"
    );

    // A sidecar with a bad token refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = cp.enroll_yaml(dir.path(), "p", "web", "demo", "2s");
    std::fs::write(dir.path().join("p.token"), "crank-jt-0000").unwrap();
    yaml.push_str(&format!(
        "admin: {{listen: {}}}\n",
        crank_tests::proxy::free_addr()
    ));
    let err = crank_tests::proxy::Proxy::try_start(
        dir.path(),
        "p",
        &yaml,
        crank_tests::proxy::free_addr(),
    )
    .err()
    .expect("must not start");
    assert!(err.contains("token-unknown"), "{err}");
}

// ---- constant load across rotations ----

#[test]
fn intermediate_and_root_rotation_under_constant_load_fail_no_request() {
    let app = EchoApp::start();
    let cp = ControlPlane::start(ControlOptions::default());
    let mesh = EnrolledMesh::start(&cp, app.addr, "");
    let first = (serial_of(&mesh.client), serial_of(&mesh.server));
    assert!(!first.0.is_empty() && !first.1.is_empty());
    let load = Load::start(mesh.port, 4);
    load.wait_for(1000);

    // Intermediate: the new one signs, both sidecars renew, the old one retires.
    let out = cp.ctl_ok(&["ca", "rotate", "intermediate", "--root", "ca/root"]);
    assert!(out.contains("phase reissuing"), "{out}");
    cp.wait_idle(Duration::from_secs(60));
    let second = (serial_of(&mesh.client), serial_of(&mesh.server));
    assert!(
        second.0 != first.0 && second.1 != first.1,
        "both sidecars renewed: {first:?} {second:?}"
    );
    let s = cp.status();
    let states: Vec<&str> = s["intermediates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retired", "signing"]);
    load.wait_for(load.ok() + 3000);

    // Root: added to every bundle, leaves reissued under it, old root removed.
    cp.ctl_ok(&["ca", "init", "--dir", "ca/root2"]);
    let out = cp.ctl_ok(&["ca", "rotate", "root", "--new-root", "ca/root2"]);
    assert!(out.contains("phase adding-root"), "{out}");
    cp.wait_idle(Duration::from_secs(60));
    let s = cp.status();
    assert_eq!(s["roots"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(
        s["bundle_version"], 3,
        "root added (v2), then the old one removed (v3)"
    );
    assert!(s["history"].as_array().unwrap().len() == 2, "{s}");
    let third = (serial_of(&mesh.client), serial_of(&mesh.server));
    assert!(third.0 != second.0 && third.1 != second.1);
    for p in [&mesh.client, &mesh.server] {
        let m = p.metrics();
        assert_eq!(metric(&m, "crank_trust_bundle_version"), Some(3.0), "{m}");
        assert!(metric(&m, "crank_cert_renewals_total{result=\"success\"}").unwrap_or(0.0) >= 2.0);
    }

    load.wait_for(20_000);
    let (ok, failed, failures) = load.stop();
    assert_eq!(
        failed, 0,
        "failed requests across the rotations: {failures:?}"
    );
    assert!(ok >= 20_000, "{ok}");

    // The server sidecar now presents a chain to the new root only.
    let inbound = mesh.inbound.to_string();
    let new_root = cp.path().join("ca/root2/bundle.pem");
    let old_root = cp.path().join("ca/root/bundle.pem");
    let ok_json = cp.ctl_ok(&[
        "cert",
        "inspect",
        "--connect",
        &inbound,
        "--server-name",
        "backend.demo.crank.local",
        "--ca",
        new_root.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok_json).unwrap();
    assert_eq!(v["verified"]["ok"], true, "{v}");
    assert_eq!(
        v["certificates"][0]["identity"]["spiffe_id"],
        "spiffe://crank.local/tenant/demo/svc/backend",
        "{v}"
    );
    let old = cp.ctl_ok(&[
        "cert",
        "inspect",
        "--connect",
        &inbound,
        "--server-name",
        "backend.demo.crank.local",
        "--ca",
        old_root.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&old).unwrap();
    assert_eq!(v["verified"]["ok"], false, "{v}");
}

// ---- renewal, expiry, revocation ----

fn get_via(port: std::net::SocketAddr) -> (u16, String) {
    curl(&[&format!("http://{port}/hello")])
}

#[test]
fn renewal_retries_while_the_control_plane_is_down_and_serves_until_expiry() {
    let app = EchoApp::start();
    let mut cp = ControlPlane::start(ControlOptions {
        leaf_ttl: "12s",
        ..Default::default()
    });
    let mesh = EnrolledMesh::start(&cp, app.addr, "");
    let first = serial_of(&mesh.client);
    cp.kill();

    // At about two thirds of its life the sidecar tries to renew, fails, and retries.
    let failures = r#"crank_cert_renewals_total{result="failure"}"#;
    wait_until(
        "a failed renewal is counted",
        Duration::from_secs(20),
        || metric(&mesh.client.metrics(), failures).unwrap_or(0.0) >= 1.0,
    );
    assert_eq!(
        get_via(mesh.port).0,
        200,
        "keeps serving with the cert it has"
    );
    assert_eq!(serial_of(&mesh.client), first);
    assert_eq!(mesh.client.admin_get("/ready").0, 200);

    // The control plane comes back (same state, same port): the retry succeeds.
    cp.spawn();
    wait_until(
        "renewed once the control plane is back",
        Duration::from_secs(30),
        || serial_of(&mesh.client) != first,
    );
    assert_eq!(get_via(mesh.port).0, 200);
    let m = mesh.client.metrics();
    assert!(
        metric(&m, r#"crank_cert_renewals_total{result="success"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // Gone for good: the cert expires and the sidecar says it is not ready.
    cp.kill();
    wait_until(
        "not ready once the cert expired",
        Duration::from_secs(30),
        || mesh.client.admin_get("/ready").0 == 503,
    );
    let (_, body) = mesh.client.admin_get("/ready");
    assert!(body.contains("cert-expired"), "{body}");
}

#[test]
fn revocation_reaches_every_sidecar_and_applies_to_open_connections() {
    let app = EchoApp::start();
    let cp = ControlPlane::start(ControlOptions::default());

    // A revoked caller: the server sidecar refuses it on the connection it
    // already has. The caller here is a TLS client holding the frontend
    // sidecar's enrolled key and cert, so the connection stays the same one.
    let mesh = EnrolledMesh::start(&cp, app.addr, "");
    assert_eq!(get_via(mesh.port).0, 200);
    let state = mesh.dir.path().join("client-state");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut conn = rt.block_on(MtlsConn::open(
        mesh.inbound,
        &state.join("cert.pem"),
        &state.join("key.pem"),
        &cp.bootstrap_bundle(),
    ));
    assert_eq!(rt.block_on(conn.get()).0, 200);
    let out = cp.ctl_ok(&["cert", "revoke", "frontend.demo.crank.local"]);
    assert!(out.contains(&serial_of(&mesh.client)), "{out}");
    wait_until(
        "the server sidecar has the new deny list",
        Duration::from_secs(10),
        || metric(&mesh.server.metrics(), "crank_cert_revoked_serials") == Some(1.0),
    );
    let (status, reason) = rt.block_on(conn.get());
    assert_eq!(
        (status, reason.as_deref()),
        (403, Some("peer-cert-revoked"))
    );
    // The revoked sidecar learns it from crank-control and stops being ready.
    wait_until(
        "the revoked sidecar says cert-revoked",
        Duration::from_secs(10),
        || mesh.client.admin_get("/ready").1.contains("cert-revoked"),
    );
    assert_eq!(mesh.client.admin_get("/ready").0, 503);
    // The revoked sidecar's own calls are answered by it, with the local
    // cause: no request is sent, and no healthy peer is blamed.
    let (status, text) = get_via(mesh.port);
    assert_eq!(status, 503, "{text}");
    assert_eq!(
        header(&text, "x-crank-error"),
        Some("own-cert-revoked"),
        "{text}"
    );
    assert_eq!(
        header(&text, "x-crank-error-origin"),
        Some("outbound"),
        "{text}"
    );
    // New connections with that cert fail the handshake.
    let _ = curl(&[
        "-sk",
        "--cert",
        state.join("cert.pem").to_str().unwrap(),
        "--key",
        state.join("key.pem").to_str().unwrap(),
        &format!("https://{}/", mesh.inbound),
    ]);
    let m = mesh.server.metrics();
    assert!(
        metric(
            &m,
            r#"crank_tls_handshake_failures_total{direction="inbound",reason="revoked"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );

    // A revoked server: the caller's sidecar refuses to send to it, on pooled connections too.
    let mut last = String::new();
    let mesh2 = EnrolledMesh::start(&cp, app.addr, "");
    assert_eq!(get_via(mesh2.port).0, 200);
    cp.ctl_ok(&["cert", "revoke", &serial_of(&mesh2.server)]);
    wait_until(
        "the revoked server is refused",
        Duration::from_secs(10),
        || {
            let (status, text) = get_via(mesh2.port);
            last = text;
            status == 502
        },
    );
    assert_eq!(
        header(&last, "x-crank-error"),
        Some("peer-cert-revoked"),
        "{last}"
    );
    let status = cp.status();
    assert_eq!(status["revoked_serials"], 2, "{status}");
}

/// One HTTP/1.1 keep-alive connection over mTLS straight to a sidecar's
/// inbound listener.
struct MtlsConn {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl MtlsConn {
    async fn open(addr: std::net::SocketAddr, cert: &Path, key: &Path, bundle: &Path) -> MtlsConn {
        let chain = crank_certs::pem::certs_from_pem(&std::fs::read(cert).unwrap()).unwrap();
        let key = crank_certs::pem::key_from_pem(&std::fs::read(key).unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for r in crank_certs::pem::certs_from_pem(&std::fs::read(bundle).unwrap()).unwrap() {
            roots.add(r).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("backend.demo.crank.local").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        MtlsConn { send }
    }

    /// GET on the same connection: (status, x-crank-error).
    async fn get(&mut self) -> (u16, Option<String>) {
        use http_body_util::BodyExt;
        self.send
            .ready()
            .await
            .expect("the connection is still open");
        let req = hyper::Request::get("/hello")
            .header("host", "backend")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        let reason = resp
            .headers()
            .get("x-crank-error")
            .map(|v| v.to_str().unwrap().to_string());
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        (status, reason)
    }
}

// ---- hot swap keeps long-lived streams ----

/// WebSocket echo (any path) and `POST /stream` echoing each body chunk as
/// it arrives (h2c or HTTP/1.1), on their own thread.
fn start_stream_app() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use futures::{SinkExt, StreamExt};
    crank_tests::serve_on_thread(|listener| async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut first = [0u8; 64];
                let n = tcp.peek(&mut first).await.unwrap_or(0);
                if String::from_utf8_lossy(&first[..n]).starts_with("GET") {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(req.into_body()))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                }
            });
        }
    })
}

/// The next data frame of a streamed response body.
async fn next_data(body: &mut hyper::body::Incoming) -> bytes::Bytes {
    use http_body_util::BodyExt;
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame within 10s")
            .expect("the stream is still open")
            .expect("no stream error");
        if let Ok(d) = f.into_data() {
            return d;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_h2_streams_and_websockets_survive_a_certificate_swap() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (app, _stop) = start_stream_app();
    let (cp, ws_mesh, h2_mesh) = tokio::task::spawn_blocking(move || {
        let cp = ControlPlane::start(ControlOptions::default());
        let ws_mesh = EnrolledMesh::start(&cp, app, "");
        let h2_mesh = EnrolledMesh::start(&cp, app, "");
        (cp, ws_mesh, h2_mesh)
    })
    .await
    .unwrap();

    // A WebSocket through the ws mesh.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", ws_mesh.port))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    // A long-lived HTTP/2 stream (h2c to the local port, h2 between the sidecars).
    let tcp = tokio::net::TcpStream::connect(h2_mesh.port).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    let req = hyper::Request::post(format!("http://{}/stream", h2_mesh.port))
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    let mut tx = tx;
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"one",
    ))))
    .await
    .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert_eq!(&next_data(&mut body).await[..], b"one");

    // Every sidecar renews and swaps its cert (an intermediate rotation asks them to).
    let serials_before: Vec<String> = [
        &ws_mesh.client,
        &ws_mesh.server,
        &h2_mesh.client,
        &h2_mesh.server,
    ]
    .iter()
    .map(|p| serial_of(p))
    .collect();
    let (cp, ws_mesh, h2_mesh, serials_after) = tokio::task::spawn_blocking(move || {
        cp.ctl_ok(&["ca", "rotate", "intermediate", "--root", "ca/root"]);
        cp.wait_idle(Duration::from_secs(60));
        let after: Vec<String> = [
            &ws_mesh.client,
            &ws_mesh.server,
            &h2_mesh.client,
            &h2_mesh.server,
        ]
        .iter()
        .map(|p| serial_of(p))
        .collect();
        (cp, ws_mesh, h2_mesh, after)
    })
    .await
    .unwrap();
    for (b, a) in serials_before.iter().zip(&serials_after) {
        assert_ne!(b, a, "every sidecar swapped its cert");
    }

    // The same WebSocket and the same HTTP/2 stream still carry data.
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
    ws.close(None).await.unwrap();
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"two",
    ))))
    .await
    .unwrap();
    assert_eq!(&next_data(&mut body).await[..], b"two");
    drop(tx);
    // And new requests use the new certs.
    let url = format!("http://{}/stream", h2_mesh.port);
    let (status, text) =
        tokio::task::spawn_blocking(move || curl(&["--data-binary", "fresh", &url]))
            .await
            .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("fresh"), "{text}");
    drop((cp, ws_mesh, h2_mesh));
}
