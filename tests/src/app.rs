//! An in-test upstream app (hyper, HTTP/1.1 and h2c) that records what it
//! received and answers with a JSON echo. It runs on its own thread and
//! runtime, so synchronous tests can use it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The bytes each connection received, one entry per connection.
pub type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// What the app saw for one request.
#[derive(Debug, Clone)]
pub struct EchoSeen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
}

impl EchoSeen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct EchoApp {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<EchoSeen>>>,
    /// With [`EchoApp::start_recording`]: every byte each connection
    /// received, one entry per connection in accept order.
    pub received: Received,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl EchoApp {
    /// Starts the app on an ephemeral port.
    pub fn start() -> EchoApp {
        EchoApp::start_with(false)
    }

    /// Like [`EchoApp::start`], and keeps the exact bytes each connection
    /// received in [`EchoApp::received`] (for framing checks: what a
    /// sidecar wrote on the wire, not what hyper made of it).
    pub fn start_recording() -> EchoApp {
        EchoApp::start_with(true)
    }

    fn start_with(record: bool) -> EchoApp {
        let seen: Arc<Mutex<Vec<EchoSeen>>> = Arc::default();
        let received: Received = Arc::default();
        let seen2 = seen.clone();
        let received2 = received.clone();
        let (addr, tx) = crate::serve_on_thread(move |listener| async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let slot = record.then(|| {
                    let mut all = received2.lock().unwrap();
                    all.push(Vec::new());
                    (received2.clone(), all.len() - 1)
                });
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                    let io = Recorded {
                        inner: stream,
                        slot,
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        EchoApp {
            addr,
            seen,
            received,
            _shutdown: tx,
        }
    }

    pub fn last(&self) -> Option<EchoSeen> {
        self.seen.lock().unwrap().last().cloned()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<EchoSeen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    // Count the body frame by frame: never buffered whole.
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    if path.starts_with("/slow") {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    let rec = EchoSeen {
        method,
        path,
        version,
        headers,
        body_bytes,
    };
    let json = serde_json::json!({
        "method": rec.method,
        "path": rec.path,
        "version": rec.version,
        "body_bytes": rec.body_bytes,
        "headers": rec.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>(),
    });
    seen.lock().unwrap().push(rec);
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-echo", "1")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap())
}

/// The app's side of a connection; with a slot, appends every byte read to
/// `EchoApp::received[slot]`.
struct Recorded {
    inner: TcpStream,
    slot: Option<(Received, usize)>,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((all, i))) = (&r, &this.slot) {
            all.lock().unwrap()[*i].extend_from_slice(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
