//! An in-test upstream app (hyper, HTTP/1.1 and h2c) that records what it
//! received and answers with a JSON echo. It runs on its own thread and
//! runtime, so synchronous tests can use it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

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
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl EchoApp {
    /// Starts the app on an ephemeral port.
    pub fn start() -> EchoApp {
        let seen: Arc<Mutex<Vec<EchoSeen>>> = Arc::default();
        let seen2 = seen.clone();
        let (addr, tx) = crate::serve_on_thread(move |listener| async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        EchoApp {
            addr,
            seen,
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
