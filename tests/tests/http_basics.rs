//! The basic mesh path with real curl: HTTP/1.1 through the local port and
//! through `HTTP_PROXY`, h2c from the app, identity header, transparency.

use crank_tests::{curl, header, metric, EchoApp, Mesh, MeshOptions};

#[test]
fn http1_through_local_port_reaches_app_unchanged() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let (status, out) = curl(&["-H", "x-custom: kept", &mesh.port_url("/hello?a=1")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(header(&out, "x-echo"), Some("1"));
    let seen = app.last().expect("the app saw the request");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/hello?a=1");
    assert_eq!(seen.header("x-custom"), Some("kept"));
    // The verified caller identity, set by the server sidecar.
    assert_eq!(
        seen.header("x-crank-client-id"),
        Some("spiffe://crank.local/tenant/demo/svc/frontend")
    );
    // Sidecars talked HTTP/2 over mTLS: the server sidecar counts an inbound 2xx.
    let m = mesh.server.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_requests_total{direction=\"inbound\",route=\"app\",status_class=\"2xx\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let c = mesh.client.metrics();
    assert_eq!(
        metric(
            &c,
            "crank_requests_total{direction=\"outbound\",route=\"backend\",status_class=\"2xx\"}"
        ),
        Some(1.0),
        "{c}"
    );
}

#[test]
fn http_proxy_routes_by_host_and_refuses_unknown_hosts() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let proxy = format!("http://{}", mesh.http_proxy);
    let (status, out) = curl(&["-x", &proxy, "http://backend/via-proxy"]);
    assert_eq!(status, 200, "{out}");
    let seen = app.last().unwrap();
    assert_eq!(seen.path, "/via-proxy");
    assert_eq!(seen.header("host"), Some("backend"));

    let (status, out) = curl(&["-x", &proxy, "http://nobody-serves-this/"]);
    assert_eq!(status, 404, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("no-route"));
    assert!(out.contains("nobody-serves-this"), "{out}");
    assert_eq!(app.count(), 1, "an unrouted request must not reach any app");
}

#[test]
fn a_client_spoofing_the_identity_header_is_overwritten() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let (status, _) = curl(&[
        "-H",
        "x-crank-client-id: spiffe://crank.local/tenant/root/svc/admin",
        &mesh.port_url("/"),
    ]);
    assert_eq!(status, 200);
    assert_eq!(
        app.last().unwrap().header("x-crank-client-id"),
        Some("spiffe://crank.local/tenant/demo/svc/frontend")
    );
}

#[test]
fn h2c_from_the_app() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let (status, out) = curl(&["--http2-prior-knowledge", &mesh.port_url("/h2c")]);
    assert_eq!(status, 200, "{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert_eq!(app.last().unwrap().path, "/h2c");
}
