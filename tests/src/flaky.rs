//! A worker app whose health the test controls: healthy, it answers 200
//! with its name; failing, it answers the status the test set. It counts
//! every request it sees, so a test can prove what reached the upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Default)]
struct State {
    fail_with: AtomicU16,
    count: AtomicUsize,
}

pub struct FlakyApp {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FlakyApp {
    pub fn start(name: &str) -> FlakyApp {
        let state: Arc<State> = Arc::default();
        let (s2, n2) = (state.clone(), name.to_string());
        let (addr, tx) = crate::serve_on_thread(move |listener| async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, n) = (s2.clone(), n2.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| handle(req, s.clone(), n.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FlakyApp {
            addr,
            name: name.to_string(),
            state,
            _shutdown: tx,
        }
    }

    /// Answer every request with `status` from now on (0: healthy again).
    pub fn fail_with(&self, status: u16) {
        self.state.fail_with.store(status, Ordering::SeqCst);
    }

    /// Requests seen so far.
    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    name: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = state.count.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = req.into_body().collect().await;
    let fail = state.fail_with.load(Ordering::SeqCst);
    let (status, body) = if fail == 0 {
        (200, format!("{name} #{n}\n"))
    } else {
        (fail, format!("{name} failing\n"))
    };
    Ok(Response::builder()
        .status(status)
        .header("x-app", name)
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}
