//! The admin listener: `/live`, `/ready`, `/metrics`, `/config_dump`.
//!
//! It runs on its own thread and Tokio runtime (hyper), outside Pingora's
//! services, because Pingora closes every service's listener the moment a
//! drain starts. The admin must keep answering during the drain, so probes
//! see `503 not ready: draining` rather than a refused connection.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::state::Shared;

/// Answers one admin request. Pure over the shared state.
pub fn respond(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body): (u16, &str, Vec<u8>) = match path {
        "/live" => (200, "text/plain", b"live\n".to_vec()),
        "/ready" => {
            shared.health.refresh_gauge();
            match shared.health.not_ready_reason() {
                None => (200, "text/plain", b"ready\n".to_vec()),
                Some(why) => {
                    let hint = shared.health.hint_for(why);
                    let hint = hint.map(|h| format!("; {h}")).unwrap_or_default();
                    (
                        503,
                        "text/plain",
                        format!("not ready: {why}{hint}\n").into_bytes(),
                    )
                }
            }
        }
        "/metrics" => {
            shared.health.refresh_gauge();
            (200, "text/plain; version=0.0.4", shared.metrics.render())
        }
        "/config_dump" => (200, "application/json", shared.config_dump()),
        _ => (
            404,
            "text/plain",
            b"unknown admin path; try /live, /ready, /metrics or /config_dump\n".to_vec(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

/// Serves the admin endpoints on `listener` from a dedicated thread until
/// the process exits.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("crank-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let resp = respond(&shared, req.uri().path());
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        })?;
    Ok(())
}
