//! The admin listener: `/live`, `/ready`, `/metrics`, `/config_dump`,
//! `/mesh/tenants` (the pushed `tenants.yaml`, for the worker shim behind
//! this sidecar) and `/tap` (live traffic as JSON lines, see [`crate::tap`]).
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
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

use crate::enroll::AgentStatus;
use crate::mesh::Mesh;
use crate::runtime::Runtime;

use super::reload::Reloader;

/// What the admin endpoints read: the runtime, the reloader's last refusal,
/// the identity agent's and the mesh part's status.
pub struct AdminState {
    pub rt: Arc<Runtime>,
    pub reloader: Arc<Reloader>,
    pub enrollment: Option<Arc<AgentStatus>>,
    pub mesh: Option<Arc<Mesh>>,
}

/// Answers one admin request. Pure over the admin state.
pub fn respond(state: &AdminState, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body): (u16, &str, Vec<u8>) = match path {
        "/live" => (200, "text/plain", b"live\n".to_vec()),
        "/ready" => {
            state.rt.health.refresh_gauge();
            match state.rt.health.not_ready_reason() {
                None => (200, "text/plain", b"ready\n".to_vec()),
                Some(why) => {
                    let hint = state.rt.health.hint_for(why);
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
            state.rt.health.refresh_gauge();
            (200, "text/plain; version=0.0.4", state.rt.metrics.render())
        }
        "/config_dump" => (200, "application/json", super::dump::config_dump(state)),
        "/mesh/tenants" => mesh_tenants(state),
        _ => (
            404,
            "text/plain",
            b"unknown admin path; try /live, /ready, /metrics, /config_dump, /mesh/tenants or /tap\n"
                .to_vec(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

/// `GET /mesh/tenants`: the `tenants.yaml` of the applied mesh update as
/// JSON, or 404 with a JSON error when none was pushed.
fn mesh_tenants(state: &AdminState) -> (u16, &'static str, Vec<u8>) {
    let applied = state.mesh.as_ref().and_then(|m| m.applied());
    match applied.as_ref().and_then(|u| u.tenants.as_ref()) {
        Some(t) => (
            200,
            "application/json",
            serde_json::to_vec(t).unwrap_or_default(),
        ),
        None => {
            let why = if state.mesh.is_none() {
                "this proxy has no `mesh` section: nothing is pushed to it"
            } else if applied.is_none() {
                "no mesh update applied yet: the control plane has not answered"
            } else {
                "the applied mesh update has no tenants: the mesh config directory has no tenants.yaml"
            };
            let body = serde_json::json!({ "error": why });
            (404, "application/json", body.to_string().into_bytes())
        }
    }
}

/// Serves the admin endpoints on `listener` from a dedicated thread until
/// the process exits. crank-plumbing's accept loop: an accept error (out of
/// file descriptors, say) is logged and backed off, not spun on.
pub fn spawn(listener: TcpListener, state: Arc<AdminState>) -> std::io::Result<()> {
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
                let opts = crank_plumbing::serve::ServeOptions::new("admin");
                let forever = std::future::pending::<()>();
                crank_plumbing::serve::serve_with(opts, listener, forever, move |stream, _| {
                    serve_connection(state.clone(), stream)
                })
                .await;
            })
        })?;
    Ok(())
}

/// One admin connection: HTTP/1.1, `/tap` streams, the rest answer at once.
async fn serve_connection(state: Arc<AdminState>, stream: tokio::net::TcpStream) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = match req.uri().path() {
            "/tap" => tap(&state.rt, req.uri().query().unwrap_or("")),
            path => respond(&state, path).map(|b| b.boxed()),
        };
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `GET /tap?status=5xx&capability=...`: finished requests as JSON lines,
/// until the client goes away or `limit` events were sent. A client that
/// reads slowly loses events (`crank_tap_events_dropped_total`); requests
/// never wait for it.
fn tap(rt: &Runtime, query: &str) -> Response<AdminBody> {
    let filter = match crate::tap::TapFilter::parse(query) {
        Ok(f) => f,
        Err(e) => {
            return Response::builder()
                .status(400)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from(format!("{e}\n"))).boxed())
                .expect("static response parts")
        }
    };
    let mut sub = rt.tap.subscribe(filter);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let limit = sub.limit();
        let mut sent = 0u64;
        loop {
            let ev = tokio::select! {
                ev = sub.next() => ev,
                _ = tx.closed() => None,
            };
            let Some(ev) = ev else { break };
            let mut line = serde_json::to_vec(&*ev).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                break;
            }
            sent += 1;
            if limit > 0 && sent >= limit {
                break;
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-store")
        .body(ChannelBody(rx).boxed())
        .expect("static response parts")
}

/// A response body fed by a channel: one data frame per message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}
