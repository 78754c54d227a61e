//! The agent's enrollment against a tiny in-test crank-control: TLS with a
//! server certificate for `control.crank-system.crank.local`, canned answers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crank_api::identity::{ApiError, Bundle, EnrollRequest, IssueResponse};
use crank_api::proxy::IdentityConfig;
use crank_certs::{Ca, Identity, LeafRequest};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::*;

/// What the fake crank-control answers to an enroll request.
#[derive(Clone)]
enum Answer {
    /// Sign the CSR with this CA for this identity.
    Sign(Arc<Ca>, Identity, String),
    /// An error answer.
    Refuse(u16, &'static str, &'static str),
}

struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    _rt: tokio::runtime::Runtime,
}

/// A TLS acceptor presenting crank-control's identity, signed by `root`:
/// the server side of the fake control planes in the enroll tests.
pub(crate) fn control_acceptor(root: &Ca) -> tokio_rustls::TlsAcceptor {
    let control = Identity::new("control", "crank-system", "crank.local").unwrap();
    let leaf = root
        .issue(&LeafRequest::new(control, Duration::from_secs(3600)))
        .unwrap();
    let chain = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
    let key = crank_certs::pem::key_from_pem(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn fake_control(root: &Ca, answer: Answer) -> Fake {
    let acceptor = control_acceptor(root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, answer, seen) = (acceptor.clone(), answer.clone(), seen2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (answer, seen) = (answer.clone(), seen.clone());
                        async move {
                            let path = req.uri().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body = String::from_utf8_lossy(&body).into_owned();
                            seen.lock().unwrap().push((path, body.clone()));
                            let (status, json) = match answer {
                                Answer::Sign(ca, id, bundle) => {
                                    let req: EnrollRequest = serde_json::from_str(&body).unwrap();
                                    let s = ca
                                        .sign_csr(&req.csr, &id, Duration::from_secs(3600))
                                        .unwrap();
                                    let r = IssueResponse {
                                        chain: s.chain_pem,
                                        serial: s.serial,
                                        not_before: s.not_before,
                                        not_after: s.not_after,
                                        bundle: Bundle {
                                            version: 4,
                                            pem: bundle,
                                        },
                                    };
                                    (200, serde_json::to_vec(&r).unwrap())
                                }
                                Answer::Refuse(status, code, message) => (
                                    status,
                                    serde_json::to_vec(&ApiError {
                                        error: code.into(),
                                        message: message.into(),
                                    })
                                    .unwrap(),
                                ),
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(json)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Fake {
        addr,
        seen,
        _rt: rt,
    }
}

fn config(dir: &Path, control: SocketAddr, root: &Ca) -> IdentityConfig {
    std::fs::write(dir.join("bootstrap.pem"), root.cert_pem()).unwrap();
    std::fs::write(dir.join("web.token"), "tok-123\n").unwrap();
    let yaml = format!(
        "trust_bundle: bootstrap.pem\nenroll: {{control_plane: \"{control}\", service: web, tenant: acme, token_file: web.token, state_dir: state}}\n"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

#[test]
fn enrolls_saves_and_loads_on_restart() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let int = root
        .generate_intermediate(Duration::from_secs(86_400))
        .unwrap();
    let web = Identity::new("web", "acme", "crank.local").unwrap();
    let fake = fake_control(
        &root,
        Answer::Sign(Arc::new(int), web.clone(), root.cert_pem().to_string()),
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), fake.addr, &root);

    let b = bootstrap(&cfg, d.path()).unwrap();
    assert_eq!(b.material.chain.len(), 2, "leaf then intermediate");
    assert_eq!(b.seed.bundle_version(), 4);
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "/v1/identity/enroll");
    let req: EnrollRequest = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(req.token, "tok-123");
    let state = d.path().join("state");
    assert_eq!(
        req.instance,
        std::fs::read_to_string(state.join("instance"))
            .unwrap()
            .trim()
    );
    for f in ["key.pem", "cert.pem", "bundle.pem", "instance"] {
        assert!(state.join(f).exists(), "{f}");
    }
    let tls =
        crate::identity::WorkloadTls::from_material(b.material, &crate::metrics::Metrics::new())
            .unwrap();
    assert_eq!(tls.identity, web);

    // A restart uses the saved material and does not call crank-control.
    let again = bootstrap(&cfg, d.path()).unwrap();
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
    assert_eq!(again.seed.serial, canonical_serial(&tls.summary().serial));
    assert_eq!(again.seed.status.to_json()["source"], "loaded");
    check(&cfg, d.path()).unwrap();
}

#[test]
fn a_refusal_fails_at_once_with_crank_controls_message() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let fake = fake_control(
        &root,
        Answer::Refuse(
            403,
            "token-reused",
            "this join token was already used by instance 77; create a new one",
        ),
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), fake.addr, &root);
    let e = bootstrap(&cfg, d.path()).err().unwrap().to_string();
    assert!(e.contains("403 token-reused"), "{e}");
    assert!(e.contains("already used by instance 77"), "{e}");
    assert!(e.contains("crankctl token create"), "{e}");
    assert_eq!(fake.seen.lock().unwrap().len(), 1, "no retry after a 4xx");
    assert!(!d.path().join("state/cert.pem").exists());
}

#[test]
fn a_server_outside_the_bundle_is_not_trusted() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let other = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let fake = fake_control(&other, Answer::Refuse(500, "x", "y"));
    let client = Client::new(&fake.addr.to_string(), "control.crank-system.crank.local").unwrap();
    let roots = crank_certs::pem::certs_from_pem(root.cert_pem().as_bytes()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(client.call(
            &roots,
            None,
            http::Method::GET,
            "/",
            None,
            Duration::from_secs(5),
        ))
        .unwrap_err();
    assert!(matches!(e, CallError::Transport { .. }), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[test]
fn no_state_and_no_token_says_what_to_do() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "127.0.0.1:1".parse().unwrap(), &root);
    std::fs::remove_file(d.path().join("web.token")).unwrap();
    let e = bootstrap(&cfg, d.path()).err().unwrap().to_string();
    assert!(e.contains("nothing is enrolled yet"), "{e}");
    assert!(
        e.contains("crankctl token create --service web --tenant acme"),
        "{e}"
    );
    assert!(e.contains("web.token"), "{e}");
    let e = check(&cfg, d.path()).unwrap_err().to_string();
    assert!(e.contains("crankctl token create"), "{e}");
}

#[test]
fn enrolling_again_trusts_the_current_roots_saved_in_state_dir() {
    // crank-control moved to a new root (a root rotation the sidecar
    // followed); the configured bootstrap bundle still holds the old one.
    let old = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let new = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let int = Arc::new(
        new.generate_intermediate(Duration::from_secs(86_400))
            .unwrap(),
    );
    let web = Identity::new("web", "acme", "crank.local").unwrap();
    let fake = fake_control(
        &int,
        Answer::Sign(int.clone(), web, new.cert_pem().to_string()),
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), fake.addr, &old);
    let state = d.path().join("state");

    let der = |ca: &Ca| crank_certs::pem::certs_from_pem(ca.cert_pem().as_bytes()).unwrap();
    state::ensure_dir(&state).unwrap();
    assert_eq!(control_roots(&cfg, d.path(), &state).unwrap(), der(&old));

    // With the current roots saved, enrollment trusts crank-control.
    state::save_bundle(&state, new.cert_pem()).unwrap();
    let both = [der(&old), der(&new)].concat();
    assert_eq!(control_roots(&cfg, d.path(), &state).unwrap(), both);
    let b = bootstrap(&cfg, d.path()).unwrap();
    assert_eq!(b.seed.status.to_json()["source"], "enrolled");
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
    assert_eq!(
        state::token_used(&state),
        Some(recover::token_digest("tok-123"))
    );

    // The same token is not sent again: it was used.
    std::fs::remove_file(state.join("cert.pem")).unwrap();
    let e = bootstrap(&cfg, d.path()).err().unwrap().to_string();
    assert!(e.contains("used by its last enrollment"), "{e}");
    assert!(e.contains("crankctl token create"), "{e}");
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
}

#[test]
fn the_recovery_hint_names_the_token_file() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path(), "127.0.0.1:1".parse().unwrap(), &root);
    let e = cfg.enroll.as_mut().unwrap();
    let hint = recovery_hint(e, d.path());
    assert!(
        hint.contains(&d.path().join("web.token").display().to_string()),
        "{hint}"
    );
    assert!(hint.contains("enrolls again by itself"), "{hint}");
    e.token_file = None;
    let hint = recovery_hint(e, d.path());
    assert!(
        hint.contains("CRANK_JOIN_TOKEN") && hint.contains("restart"),
        "{hint}"
    );
}
