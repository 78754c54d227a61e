//! End-to-end checks of the demo apps: real sockets on ephemeral ports, real
//! HTTP/1.1 and h2c clients, the frontend calling the backend directly and
//! through an `HTTP_PROXY`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use crank_examples::backend::{self, Echo};
use crank_examples::frontend::{self, Frontend};
use crank_examples::proxy_env::{HttpProxy, ProxyEnv};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running app: its address, its stop switch and its task.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        done.expect("the app stops promptly").unwrap().unwrap();
    }
}

async fn start_backend(name: &str) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let shutdown = async move { stopped.await.unwrap_or(()) };
    let task = tokio::spawn(backend::serve(listener, name.to_string(), shutdown));
    Running { addr, stop, task }
}

async fn start_frontend(backend_url: &str, proxy: Option<SocketAddr>) -> Running {
    let http_proxy = proxy.map(|p| HttpProxy {
        url: format!("http://{p}"),
        host: p.ip().to_string(),
        port: p.port(),
    });
    let proxy_env = ProxyEnv {
        http_proxy,
        no_proxy: vec![],
    };
    let frontend = Frontend::new("frontend".into(), backend_url, proxy_env).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let shutdown = async move { stopped.await.unwrap_or(()) };
    let task = tokio::spawn(frontend::serve(listener, frontend, shutdown));
    Running { addr, stop, task }
}

/// Sends one request over a fresh HTTP/1.1 connection to `addr`.
async fn h1<B>(addr: SocketAddr, req: Request<B>) -> (StatusCode, Bytes)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn backend_echoes_an_http1_request_exactly() {
    let backend = start_backend("backend").await;
    let req = Request::get("/hello?x=1")
        .header("host", "backend")
        .header("x-demo", "a")
        .header("x-demo", "b")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, body) = h1(backend.addr, req).await;
    assert_eq!(status, StatusCode::OK);
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.service, "backend");
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.uri, "/hello?x=1");
    assert_eq!(echo.path, "/hello");
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.headers["host"], "backend");
    assert_eq!(echo.headers["x-demo"], "a, b");
    assert_eq!(echo.body_bytes, 0);

    let (status, body) = h1(backend.addr, get(backend.addr, "/healthz")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    backend.stop().await;
}

#[tokio::test]
async fn backend_counts_a_large_posted_body() {
    let backend = start_backend("backend").await;
    let size = 3 * 1024 * 1024 + 7;
    let req = Request::post("/upload")
        .header("host", "backend")
        .body(Full::new(Bytes::from(vec![b'x'; size])))
        .unwrap();
    let (status, body) = h1(backend.addr, req).await;
    assert_eq!(status, StatusCode::OK);
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (echo.method.as_str(), echo.body_bytes),
        ("POST", size as u64)
    );
    backend.stop().await;
}

#[tokio::test]
async fn backend_speaks_h2c_with_prior_knowledge() {
    let backend = start_backend("backend").await;
    let io = TokioIo::new(TcpStream::connect(backend.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://backend/grpc-ish")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: Echo =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo.version, "HTTP/2.0");
    assert_eq!(echo.path, "/grpc-ish");
    drop(sender);
    backend.stop().await;
}

#[tokio::test]
async fn frontend_calls_the_backend_directly_without_a_proxy() {
    let backend = start_backend("backend").await;
    let url = format!("http://{}/hello", backend.addr);
    let frontend = start_frontend(&url, None).await;
    let (status, body) = h1(frontend.addr, get(frontend.addr, "/")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["service"], "frontend");
    assert_eq!(v["called"], url);
    assert_eq!(v["via_proxy"], Value::Null);
    assert_eq!(v["backend_status"], 200);
    assert_eq!(
        v["backend_response"]["uri"], "/hello",
        "direct calls use origin-form"
    );
    assert_eq!(
        v["backend_response"]["headers"]["host"],
        backend.addr.to_string()
    );
    frontend.stop().await;
    backend.stop().await;
}

#[tokio::test]
async fn frontend_sends_absolute_form_through_http_proxy() {
    // The backend is no proxy, but it shows the request line it was sent.
    let backend = start_backend("backend").await;
    let frontend = start_frontend("http://backend/hello", Some(backend.addr)).await;
    let (status, body) = h1(frontend.addr, get(frontend.addr, "/")).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["via_proxy"], format!("http://{}", backend.addr));
    assert_eq!(v["backend_response"]["uri"], "http://backend/hello");
    assert_eq!(v["backend_response"]["path"], "/hello");
    assert_eq!(v["backend_response"]["headers"]["host"], "backend");
    frontend.stop().await;
    backend.stop().await;
}

#[tokio::test]
async fn frontend_answers_502_with_a_reason_when_the_proxy_is_down() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let frontend = start_frontend("http://backend/hello", Some(closed)).await;
    let (status, body) = h1(frontend.addr, get(frontend.addr, "/")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains(&closed.to_string()) && error.contains("is the sidecar running"),
        "{error}"
    );
    frontend.stop().await;
}

#[tokio::test]
async fn stopping_lets_an_open_keepalive_connection_go() {
    let backend = start_backend("backend").await;
    let io = TokioIo::new(TcpStream::connect(backend.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(get(backend.addr, "/")).await.unwrap();
    resp.into_body().collect().await.unwrap();
    // The idle keep-alive connection must not hold the stop up.
    backend.stop().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    closed
        .expect("the server closed the idle connection")
        .unwrap()
        .unwrap();
}
