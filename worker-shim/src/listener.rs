//! The shim's HTTP server: every listener (the job API, the admin
//! listener, serve mode's front proxy) is crank-plumbing's accept loop
//! (backoff on accept errors, no spin) serving HTTP/1.1 and h2c with
//! hyper, with a graceful close.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use crank_plumbing::ServeOptions;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves `handler` on `listener` (HTTP/1.1 and h2c) until `stop`, then
/// closes the listener and lets open connections finish for up to
/// `grace`. `name` is the config key of the listener, for the logs.
pub async fn serve<F, Fut, B>(
    name: &'static str,
    listener: TcpListener,
    handler: F,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let stopped = async {
        let _ = stop.wait_for(|s| *s).await;
    };
    let connection = |stream: tokio::net::TcpStream, _peer| {
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let fut = h(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
    };
    // The loop owns the listener: it is closed when the loop returns.
    crank_plumbing::serve_with(ServeOptions::new(name), listener, stopped, connection).await;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            listener = name,
            "some client connections were still open at shutdown"
        );
    }
}
