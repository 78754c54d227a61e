//! The front proxy: the shim's listener, forwarded to the worker over
//! pooled HTTP/1.1 connections with both bodies streamed, and the shim's
//! own answers (`503 worker-not-ready` / `worker-draining`,
//! `501 upgrade-not-supported`, `502 worker-unreachable`) in the mesh's one
//! error body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crank_plumbing::headers::strip_hop_by_hop;
use crank_plumbing::signal::Guard;
use crank_plumbing::Refusal;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{error_chain, Shared};

/// After the drain, how long idle client connections get to close.
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(1);

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The proxy's half of the state: the shared part and the worker's client.
struct Front {
    shared: Arc<Shared>,
    client: Client<HttpConnector, Incoming>,
    /// `http://<upstream>`
    upstream_base: String,
}

/// Accepts connections until a stop, then lets them close (briefly).
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let front = Arc::new(Front {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream_base: format!("http://{}", shared.cfg.upstream),
        shared,
    });
    crate::listener::serve(
        "listen",
        listener,
        move |req| answer(front.clone(), req),
        stop,
        CONNECTION_CLOSE_GRACE,
    )
    .await
}

/// Forwards `req` and counts the answer by status class.
async fn answer(front: Arc<Front>, req: Request<Incoming>) -> Response<ProxyBody> {
    let resp = forward(&front, req).await;
    let class = match resp.status().as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    };
    front
        .shared
        .metrics
        .requests
        .with_label_values(&[class])
        .inc();
    resp
}

async fn forward(front: &Front, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(refusal) = refuse(&front.shared, &req) {
        return refused(&refusal);
    }
    let guard = InflightGuard::new(&front.shared);
    let req = match upstream_request(&front.upstream_base, req) {
        Ok(req) => req,
        Err(refusal) => return refused(&refusal),
    };
    match front.client.request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = Tracked {
                inner: body,
                guard: Some(guard),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => refused(&failed(front, &e)),
    }
}

/// What the shim answers itself instead of forwarding: draining, not
/// ready, or an upgrade.
fn refuse(shared: &Shared, req: &Request<Incoming>) -> Option<Refusal> {
    if shared.draining() {
        return Some(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker-draining",
            "this instance is shutting down; retry on another one",
        ));
    }
    if !shared.is_ready() {
        return Some(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker-not-ready",
            format!(
                "the worker is starting, restarting or failing its health check ({})",
                shared.cfg.health_path
            ),
        ));
    }
    is_upgrade(req).then(|| {
        Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "upgrade-not-supported",
            "protocol upgrades (WebSocket) and CONNECT are not supported in serve mode",
        )
    })
}

/// The request as the worker gets it: origin-form target on the upstream,
/// `Host` kept (from `:authority` over HTTP/2), no hop-by-hop headers,
/// HTTP/1.1.
fn upstream_request(base: &str, req: Request<Incoming>) -> Result<Request<Incoming>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = format!("{base}{target}").parse().map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad-request-target",
            format!("the request target cannot be forwarded: {e}"),
        )
    })?;
    if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in `:authority`; the worker speaks HTTP/1.1.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, value);
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// The worker could not be reached, or its answer failed.
fn failed(front: &Front, e: &hyper_util::client::legacy::Error) -> Refusal {
    if e.is_connect() {
        return Refusal::new(
            StatusCode::BAD_GATEWAY,
            "worker-unreachable",
            format!(
                "connecting to the worker at {} failed: {}",
                front.shared.cfg.upstream,
                error_chain(e)
            ),
        );
    }
    Refusal::new(
        StatusCode::BAD_GATEWAY,
        "worker-error",
        format!("the worker's response failed: {}", error_chain(e)),
    )
}

/// An upgrade other than to `h2c` (which a server may ignore), or `CONNECT`
/// (also HTTP/2's extended CONNECT for WebSocket).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.headers().get_all(header::UPGRADE).iter().any(|value| {
        value.to_str().map_or(true, |v| {
            v.split(',')
                .any(|p| !p.trim().is_empty() && !p.trim().eq_ignore_ascii_case("h2c"))
        })
    })
}

/// The shim's own answers: the mesh's error body
/// (`{"error":"<reason>","message":"…"}`), the reason also in
/// `x-crank-error`; 503s say `Retry-After: 1`.
fn refused(refusal: &Refusal) -> Response<ProxyBody> {
    let mut refusal = refusal.clone();
    if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
        refusal = refusal.retry_after(1);
    }
    refusal
        .response::<Full<Bytes>>()
        .map(|body| body.map_err(|never| match never {}).boxed())
}

/// Counts one forwarded request from its arrival until its response body
/// finishes or is dropped.
struct InflightGuard {
    shared: Arc<Shared>,
    _drain: Guard,
}

impl InflightGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.metrics.inflight.inc();
        InflightGuard {
            _drain: shared.drain.guard(),
            shared: shared.clone(),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.shared.metrics.inflight.dec();
    }
}

/// The worker's response body, streamed as is, holding the in-flight guard
/// until its end (or an error, or its drop).
struct Tracked {
    inner: Incoming,
    guard: Option<InflightGuard>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(res, Poll::Ready(None | Some(Err(_)))) {
            this.guard = None;
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
