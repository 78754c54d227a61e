//! Egress routes (issue #16, item 4): a client's sidecar sends a route's
//! traffic to a destination outside the mesh, a plain HTTP server standing
//! in for Ray Serve and a TLS one with its own CA, with the route's
//! timeout, retries, quota, outbound policy and metrics; a destination
//! nothing declares is refused in `deny` mode and passed through, logged,
//! in `audit` mode. Everything on loopback: the "outside" servers are
//! in-test servers the sidecars reach by address or by `localhost`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crank_certs::{Ca, Identity, LeafRequest};
use crank_tests::pki::Pki;
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::{curl, header, metric, wait_until};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What the stand-in for Ray Serve saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    flaky: AtomicUsize,
    last_host: Mutex<String>,
}

/// Ray Serve's stand-in: `/flaky` fails its first request with 503,
/// `/slow` answers after 5 s, anything else 200 with the path.
async fn ray(req: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    *seen.last_host.lock().unwrap() = host.to_string();
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    let status = match path.as_str() {
        "/flaky" if seen.flaky.fetch_add(1, Ordering::SeqCst) == 0 => 503,
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            200
        }
        _ => 200,
    };
    let resp = Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(format!("ray {path}\n"))))
        .unwrap();
    Ok(resp)
}

/// A listener on an ephemeral port of every address, both families where
/// the host has IPv6 (so `localhost` works however it resolves), else
/// 127.0.0.1. The address returned is 127.0.0.1's.
fn dual_stack() -> std::net::TcpListener {
    let l = std::net::TcpListener::bind("[::]:0")
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// Serves [`ray`] on an ephemeral port, plain or over `tls`.
fn start_ray(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Arc<Seen>, tokio::sync::oneshot::Sender<()>) {
    let seen: Arc<Seen> = Arc::default();
    let s = seen.clone();
    let std_listener = dual_stack();
    let addr = SocketAddr::from(([127, 0, 0, 1], std_listener.local_addr().unwrap().port()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = move |listener: tokio::net::TcpListener| async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (s, tls) = (s.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| ray(req, s.clone()));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            tokio::select! {
                _ = serve(listener) => {}
                _ = stopped => {}
            }
        });
    });
    (addr, seen, stop)
}

/// A CA of the outside world (not the mesh's) and a server certificate for
/// `ray.serve.example` it signed: the acceptor, and the CA's PEM path.
fn outside_tls(dir: &Path) -> (tokio_rustls::TlsAcceptor, String) {
    let ca = Ca::generate("example", Duration::from_secs(3600)).unwrap();
    let id = Identity::new("ray", "serve", "example").unwrap();
    let leaf = ca
        .issue(&LeafRequest::new(id, Duration::from_secs(3600)))
        .unwrap();
    let chain = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
    let key = crank_certs::pem::key_from_pem(leaf.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let ca_path = dir.join("ray-ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ca_path.display().to_string(),
    )
}

/// The outside servers and a client sidecar whose `egress.mode` is `mode`.
struct World {
    pki: Pki,
    ray: SocketAddr,
    seen: Arc<Seen>,
    tls: SocketAddr,
    tls_seen: Arc<Seen>,
    other: SocketAddr,
    other_seen: Arc<Seen>,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    fn new() -> World {
        let pki = Pki::new();
        let (acceptor, _) = outside_tls(pki.path());
        let (ray, seen, s1) = start_ray(None);
        let (tls, tls_seen, s2) = start_ray(Some(acceptor));
        let (other, other_seen, s3) = start_ray(None);
        World {
            pki,
            ray,
            seen,
            tls,
            tls_seen,
            other,
            other_seen,
            _stops: vec![s1, s2, s3],
        }
    }

    /// A client-only sidecar with the HTTP proxy listener, the egress
    /// destinations and routes, a quota and an outbound policy.
    fn sidecar(&self, name: &str, mode: &str) -> (Proxy, SocketAddr) {
        let dir = self.pki.path();
        let policy = dir.join(format!("{name}-policy"));
        std::fs::create_dir_all(&policy).unwrap();
        std::fs::write(policy.join("egress.rego"), POLICY).unwrap();
        let leaf = self.pki.leaf(name, "demo");
        let (listen, admin) = (free_addr(), free_addr());
        let yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
             admin: {{listen: {admin}}}\n\
             outbound: {{http_proxy: {listen}}}\n\
             egress:\n  mode: {mode}\n  destinations:\n\
             \x20   - {{name: ray, address: 'localhost:{ray}'}}\n\
             \x20   - {{name: ray-tls, address: '127.0.0.1:{tls}', tls: {{ca: ray-ca.pem, server_name: ray.serve.example}}}}\n\
             \x20   - {{name: ray-mesh-ca, address: '127.0.0.1:{tls}', tls: {{ca: {bundle}, server_name: ray.serve.example}}}}\n\
             routes:\n\
             \x20 - {{name: ray-serve, capability: 'ray:serve', egress: ray, timeout: 1s, retry: {{attempts: 2}}}}\n\
             \x20 - {{name: ray-tls, capability: 'ray:serve', egress: ray-tls}}\n\
             \x20 - {{name: ray-mesh-ca, egress: ray-mesh-ca, retry: {{attempts: 0}}}}\n\
             \x20 - {{name: ray-quota, capability: 'ray:quota', egress: ray}}\n\
             quotas:\n  limits: [{{tenant: '*', capability: 'ray:quota', rate: 1/min, burst: 1, direction: outbound}}]\n\
             policy: {{outbound: {{dir: {}}}}}\n",
            leaf.cert.display(),
            leaf.key.display(),
            self.pki.bundle().display(),
            policy.display(),
            ray = self.ray.port(),
            tls = self.tls.port(),
            bundle = self.pki.bundle().display(),
        );
        (Proxy::start(dir, name, &yaml, admin), listen)
    }
}

/// The outbound policy: egress is read-only, and its input names the
/// destination's host and port.
const POLICY: &str = r#"package crank.authz
default allow := true
deny contains sprintf("egress to %s:%d is read-only", [input.destination.host, input.destination.port]) if {
    input.destination.egress
    input.request.method == "DELETE"
}
"#;

/// `curl -x PROXY http://HOST/PATH`, with extra arguments.
fn via(proxy: SocketAddr, url: &str, extra: &[&str]) -> (u16, String) {
    let px = format!("http://{proxy}");
    let mut args = vec!["-x", px.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

#[test]
fn a_route_reaches_ray_serve_outside_the_mesh_with_the_route_features() {
    let w = World::new();
    let (client, px) = w.sidecar("web", "audit");

    let (status, out) = via(px, "http://ray-serve/hello", &[]);
    assert_eq!(status, 200, "{out}");
    assert!(out.ends_with("ray /hello\n"), "{out}");
    assert_eq!(
        *w.seen.last_host.lock().unwrap(),
        format!("localhost:{}", w.ray.port()),
        "the destination gets its own name as Host"
    );

    // Retry: the first attempt's 503 is retried, the caller sees the 200.
    let (status, out) = via(px, "http://ray-serve/flaky", &[]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(w.seen.flaky.load(Ordering::SeqCst), 2, "one retry");

    // Timeout: the route's 1 s deadline.
    let (status, out) = via(px, "http://ray-serve/slow", &[]);
    assert_eq!(status, 504, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("request-timeout"));

    // Quota: one request a minute on ray:quota.
    assert_eq!(via(px, "http://ray-quota/a", &[]).0, 200);
    let (status, out) = via(px, "http://ray-quota/b", &[]);
    assert_eq!(status, 429, "{out}");
    assert!(header(&out, "retry-after").is_some(), "{out}");

    // Policy: input.destination.egress, host and port.
    let before = w.seen.requests.load(Ordering::SeqCst);
    let (status, out) = via(px, "http://ray-serve/x", &["-X", "DELETE"]);
    assert_eq!(status, 403, "{out}");
    assert!(
        out.contains(&format!(
            "egress to localhost:{} is read-only",
            w.ray.port()
        )),
        "{out}"
    );
    assert_eq!(w.seen.requests.load(Ordering::SeqCst), before, "not sent");

    let m = client.metrics();
    let egress = |route: &str, dest: &str, class: &str| {
        metric(
            &m,
            &format!("crank_egress_requests_total{{destination=\"{dest}\",route=\"{route}\",status_class=\"{class}\"}}"),
        )
    };
    assert_eq!(egress("ray-serve", "ray", "2xx"), Some(2.0), "{m}");
    assert_eq!(egress("ray-serve", "ray", "5xx"), Some(1.0), "{m}");
    assert_eq!(egress("ray-quota", "ray", "4xx"), Some(1.0), "{m}");
}

#[test]
fn tls_destinations_are_verified_against_their_own_ca_never_the_mesh_roots() {
    let w = World::new();
    let (client, px) = w.sidecar("web", "deny");

    let (status, out) = via(px, "http://ray-tls/hello", &[]);
    assert_eq!(status, 200, "{out}");
    assert!(out.ends_with("ray /hello\n"), "{out}");
    assert_eq!(w.tls_seen.requests.load(Ordering::SeqCst), 1);

    // The mesh's bundle does not vouch for the outside server.
    let (status, out) = via(px, "http://ray-mesh-ca/hello", &[]);
    assert_eq!(status, 502, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("upstream-tls-failed"));
    assert_eq!(w.tls_seen.requests.load(Ordering::SeqCst), 1);
    let m = client.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_egress_requests_total{destination=\"ray-tls\",route=\"ray-tls\",status_class=\"2xx\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn an_undeclared_destination_is_refused_in_deny_mode() {
    let w = World::new();
    let (client, px) = w.sidecar("web", "deny");
    let url = format!("http://{}/x", w.other);
    let (status, out) = via(px, &url, &[]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("egress-not-declared"));
    assert!(out.contains(&w.other.to_string()), "names the host: {out}");
    assert_eq!(w.other_seen.requests.load(Ordering::SeqCst), 0);
    wait_until("the refusal in the log", Duration::from_secs(5), || {
        client.log_text().contains("egress-not-declared")
    });
    // A declared destination named directly is still reached.
    let (status, out) = via(px, &format!("http://localhost:{}/d", w.ray.port()), &[]);
    assert_eq!(status, 200, "{out}");
    let m = client.metrics();
    assert_eq!(
        metric(&m, "crank_egress_undeclared_total{mode=\"deny\"}"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn an_undeclared_destination_passes_and_is_logged_in_audit_mode() {
    let w = World::new();
    let (client, px) = w.sidecar("web", "audit");
    let (status, out) = via(px, &format!("http://{}/x", w.other), &[]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(w.other_seen.requests.load(Ordering::SeqCst), 1);
    wait_until("the audit line in the log", Duration::from_secs(5), || {
        client
            .log_text()
            .lines()
            .any(|l| l.contains("egress-not-declared") && l.contains("audit"))
    });
    // The sidecar's own HTTP proxy listener as the "destination": passed
    // through once, then refused, never a loop.
    let (status, out) = via(px, &format!("http://{px}/loop"), &[]);
    assert_eq!(status, 404, "{out}");
    assert!(out.contains("a loop"), "{out}");
    let m = client.metrics();
    assert_eq!(
        metric(&m, "crank_egress_undeclared_total{mode=\"audit\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "crank_egress_requests_total{destination=\"undeclared\",route=\"egress-undeclared\",status_class=\"2xx\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// The mesh config's `egress.yaml` (with its CA file) and an egress route,
/// pushed by crank-control to an enrolled sidecar; a mode change follows.
#[test]
fn crank_control_pushes_egress_destinations_routes_and_mode() {
    use crank_tests::control::{ControlOptions, ControlPlane};
    let w = World::new();
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\n".into(),
        ..Default::default()
    });
    let ca = std::fs::read_to_string(w.pki.path().join("ray-ca.pem")).unwrap();
    cp.write_mesh_file("egress/ray-ca.pem", &ca);
    cp.write_mesh_file("capabilities.yaml", "capabilities: [{name: 'ray:serve'}]\n");
    let egress = |mode: &str| {
        format!(
            "mode: {mode}\ndestinations:\n  - name: ray\n    address: '127.0.0.1:{}'\n    tls: {{ca: egress/ray-ca.pem, server_name: ray.serve.example}}\n",
            w.tls.port()
        )
    };
    cp.write_mesh_file("egress.yaml", &egress("deny"));
    cp.write_mesh_file(
        "routes/ray.yaml",
        "routes:\n  - name: ray-serve\n    match: {hosts: [ray-serve]}\n    backends: [{capability: 'ray:serve', egress: ray}]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (px, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound: {{http_proxy: {px}}}\nmesh: {{watch_wait: 2s}}\nadmin: {{listen: {admin}}}\n",
        cp.enroll_yaml(dir.path(), "web", "web", "demo", "2s"),
    );
    let client = Proxy::start(dir.path(), "web", &yaml, admin);
    wait_until("the pushed egress route", Duration::from_secs(20), || {
        via(px, "http://ray-serve/hello", &[]).0 == 200
    });
    assert!(w.tls_seen.requests.load(Ordering::SeqCst) >= 1);
    let undeclared = format!("http://{}/x", w.other);
    let (status, out) = via(px, &undeclared, &[]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("egress-not-declared"));

    cp.write_mesh_file("egress.yaml", &egress("audit"));
    wait_until("audit mode pushed", Duration::from_secs(20), || {
        via(px, &undeclared, &[]).0 == 200
    });
    assert!(w.other_seen.requests.load(Ordering::SeqCst) >= 1);
    wait_until(
        "the audited request in the log",
        Duration::from_secs(5),
        || client.log_text().contains("egress-not-declared"),
    );
}
