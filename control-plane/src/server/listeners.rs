//! crank-control's accept loops: the workload API (TLS on `listen`), the
//! admin API (the Unix socket) and `/metrics` (`metrics_listen`). Each is
//! `crank_plumbing::serve_with` (backoff on accept errors, stops on
//! `stop`) plus a per-connection function; the handlers are elsewhere
//! ([`super::workload`], [`super::ca_admin`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crank_plumbing::{serve_with, Listener, ServeOptions};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::net::SocketAddr;

use tokio::net::unix::SocketAddr as UnixAddr;
use tokio::net::{TcpStream, UnixStream};

use super::admin_access::Caller;
use super::http::Resp;
use super::workload::{route_workload, PeerCerts};
use super::Control;

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `stop` resolves; each connection is `conn`
/// with the control plane. `name` names the listener in the logs.
pub async fn serve<L, Fut>(
    name: &'static str,
    control: Arc<Control>,
    listener: L,
    stop: impl Future<Output = ()>,
    conn: fn(Arc<Control>, L::Conn, L::Addr) -> Fut,
) where
    L: Listener,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with(ServeOptions::new(name), listener, stop, move |c, a| {
        conn(control.clone(), c, a)
    })
    .await
}

/// One workload connection: the TLS handshake, then HTTP/1.1 with the
/// client certificates at hand.
pub async fn workload_conn(control: Arc<Control>, tcp: TcpStream, addr: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(control.tls.current());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let peer_certs =
        Arc::new(PeerCerts::new(tls.get_ref().1.peer_certificates().map(
            |c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>(),
        )));
    http1(tls, move |req| {
        route_workload(control.clone(), peer_certs.clone(), req)
    })
    .await
}

/// One admin-socket connection (crankctl): full access; the peer's uid
/// (SO_PEERCRED) names it in the audit log.
pub async fn admin_conn(control: Arc<Control>, stream: UnixStream, _: UnixAddr) {
    let caller = Caller::Socket {
        uid: stream.peer_cred().ok().map(|c| c.uid()),
    };
    http1(stream, move |req| {
        let (control, caller) = (control.clone(), caller.clone());
        async move { control.admin_call(caller, req).await }
    })
    .await
}

/// One `admin_listen` connection: TLS with a client certificate from the
/// mesh CA (required by the handshake), then the admin API by role.
pub async fn admin_tls_conn(control: Arc<Control>, tcp: TcpStream, addr: SocketAddr) {
    let acceptor = tokio_rustls::TlsAcceptor::from(control.tls.admin());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(peer = %addr, error = %e, "admin TLS handshake refused (a client certificate from the mesh CA is required)");
            return;
        }
        Err(_) => return,
    };
    let summary = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| crank_certs::CertSummary::from_der(leaf).ok());
    if let Some(s) = &summary {
        let serial = crank_api::identity::canonical_serial(&s.serial);
        if control.state().is_revoked(&serial) {
            tracing::warn!(peer = %addr, serial, "admin connection with a revoked certificate closed");
            return;
        }
    }
    let caller = Caller::Cert(summary.and_then(|s| s.identity));
    http1(tls, move |req| {
        let (control, caller) = (control.clone(), caller.clone());
        async move { control.admin_call(caller, req).await }
    })
    .await
}

/// One `metrics_listen` connection: `/metrics` only.
pub async fn metrics_conn(control: Arc<Control>, tcp: TcpStream, _: SocketAddr) {
    http1(tcp, move |req| {
        let resp = if req.uri().path() == "/metrics" {
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(control.metrics.encode())))
        } else {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"only /metrics here\n")))
        };
        std::future::ready(resp.expect("a valid response"))
    })
    .await
}

/// Serves HTTP/1.1 on one connection, each request answered by `handler`,
/// until the connection closes.
async fn http1<I, F, Fut>(io: I, handler: F)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}
