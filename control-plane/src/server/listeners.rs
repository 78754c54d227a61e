//! crank-control's accept loops: the workload API (TLS on `listen`), the
//! admin API (the Unix socket) and `/metrics` (`metrics_listen`). Each is
//! `crank_plumbing::serve_with` (backoff on accept errors, stops on
//! `stop`) plus a per-connection function; the handlers are elsewhere
//! ([`super::workload`], [`super::ca_admin`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crank_plumbing::{serve_with, ServeOptions};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::workload::route_workload;
use super::Control;

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the workload API until `stop` resolves.
pub async fn serve_workloads(
    control: Arc<Control>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
) {
    serve_with(
        ServeOptions::new("workload"),
        listener,
        stop,
        |tcp, addr| workload_conn(control.clone(), tcp, addr),
    )
    .await
}

/// One workload connection: the TLS handshake, then HTTP/1.1 with the
/// client certificates at hand.
async fn workload_conn(control: Arc<Control>, tcp: TcpStream, addr: std::net::SocketAddr) {
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
    let peer_certs = Arc::new(
        tls.get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()),
    );
    let svc = hyper::service::service_fn(move |req| {
        route_workload(control.clone(), peer_certs.clone(), req)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
        .await;
}

/// Serves the admin API on the Unix socket until `stop` resolves.
pub async fn serve_admin(
    control: Arc<Control>,
    listener: UnixListener,
    stop: impl Future<Output = ()>,
) {
    serve_with(ServeOptions::new("admin"), listener, stop, |stream, _| {
        admin_conn(control.clone(), stream)
    })
    .await
}

async fn admin_conn(control: Arc<Control>, stream: UnixStream) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let control = control.clone();
        async move {
            let path = req.uri().path().to_string();
            Ok::<_, std::convert::Infallible>(
                control
                    .admin(req)
                    .await
                    .unwrap_or_else(|e| control.refused(e, &path)),
            )
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

/// Serves `/metrics` in plain HTTP on `metrics_listen` until `stop` resolves.
pub async fn serve_metrics(
    control: Arc<Control>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
) {
    serve_with(ServeOptions::new("metrics"), listener, stop, |tcp, _| {
        metrics_conn(control.clone(), tcp)
    })
    .await
}

async fn metrics_conn(control: Arc<Control>, tcp: TcpStream) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = if req.uri().path() == "/metrics" {
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(control.metrics.encode())))
        } else {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"only /metrics here\n")))
        };
        async move { Ok::<_, std::convert::Infallible>(resp.expect("a valid response")) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
        .await;
}
