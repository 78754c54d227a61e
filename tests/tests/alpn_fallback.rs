//! Between sidecars the client offers ALPN `h2` then `http/1.1`: a peer that
//! only speaks HTTP/1.1 over mTLS still gets the request, still with the
//! client certificate and the identity check.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use crank_tests::pki::{Leaf, Pki};
use crank_tests::sidecar::client_sidecar;
use crank_tests::{curl, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// An mTLS server that only offers `http/1.1`, requires a client certificate
/// from the bundle, and answers with what it negotiated.
/// The peer's address, and the handle that keeps it running.
fn start_h1_only_peer(pki: &Pki, leaf: &Leaf) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = crank_certs::pem::certs_from_pem(&std::fs::read(&leaf.cert).unwrap()).unwrap();
    let key = crank_certs::pem::key_from_pem(&std::fs::read(&leaf.key).unwrap()).unwrap();
    let mut roots = RootCertStore::empty();
    for root in crank_certs::pem::certs_from_pem(&std::fs::read(pki.bundle()).unwrap()).unwrap() {
        roots.add(root).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    crank_tests::serve_on_thread(move |listener| async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let alpn = conn
                    .alpn_protocol()
                    .map(|a| String::from_utf8_lossy(a).to_string());
                let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = format!(
                        "alpn={} version={:?} client_cert={client_cert}",
                        alpn.clone().unwrap_or_default(),
                        req.version()
                    );
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-peer", "h1-only")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    })
}

#[test]
fn a_peer_without_h2_gets_http1_over_mtls() {
    let pki = Pki::new();
    let (peer, _running) = start_h1_only_peer(&pki, &pki.leaf("backend", "demo"));
    let client = client_sidecar(
        &pki,
        "client",
        &pki.leaf("frontend", "demo"),
        peer,
        "backend.demo.crank.local",
        "5s",
    )
    .unwrap();
    for _ in 0..3 {
        let (status, out) = curl(&[&format!("http://{}/fallback", client.listen)]);
        assert_eq!(status, 200, "{out}\n{}", client.proxy.log_text());
        assert_eq!(header(&out, "x-peer"), Some("h1-only"));
        assert!(
            out.contains("alpn=http/1.1 version=HTTP/1.1 client_cert=true"),
            "{out}"
        );
    }
}
