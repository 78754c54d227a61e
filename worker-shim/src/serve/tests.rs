//! `serve::run` end to end, with real worker processes (`sh`, the demo
//! backend) and an in-test upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::Registry;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use super::*;

/// Bound on every wait for a condition.
const DEADLINE: Duration = Duration::from_secs(30);

/// The demo backend binary: `$CRANK_DEMO_BACKEND`, else the workspace's
/// debug build.
fn demo_backend() -> String {
    if let Ok(path) = std::env::var("CRANK_DEMO_BACKEND") {
        return path;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/crank-demo-backend");
    match p.exists() {
        true => p.display().to_string(),
        false => panic!(
            "crank-demo-backend not found: build it with \
             `cargo build -p crank-examples --bin crank-demo-backend` or set CRANK_DEMO_BACKEND"
        ),
    }
}

/// A loopback address nothing listens on (for the worker to bind).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn fast(mut cfg: ServeConfig) -> ServeConfig {
    cfg.health_interval = Duration::from_millis(50);
    cfg.restart_backoff_initial = Duration::from_millis(50);
    cfg.restart_backoff_max = Duration::from_millis(200);
    cfg
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Records what the shim asked of the registrar; `probe` adds a note at
/// deregistration (what the test wants to know at that moment).
#[derive(Default)]
struct TestRegistrar {
    events: Mutex<Vec<String>>,
    probe: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

impl TestRegistrar {
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Registrar for TestRegistrar {
    async fn register(&self, reg: &ShimRegistration) -> anyhow::Result<()> {
        self.events
            .lock()
            .unwrap()
            .push(format!("register {}", reg.mode));
        Ok(())
    }
    async fn deregister(&self) -> anyhow::Result<()> {
        let note = self.probe.as_ref().map(|p| p()).unwrap_or_default();
        self.events
            .lock()
            .unwrap()
            .push(format!("deregister{note}"));
        Ok(())
    }
}

/// A running `serve::run`, and a client for its listener.
struct Running {
    addr: SocketAddr,
    ready: watch::Receiver<bool>,
    metrics: ServeMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn crank_error(&self) -> &str {
        self.headers
            .get("x-crank-error")
            .map_or("", |v| v.to_str().unwrap())
    }
}

async fn start(cfg: ServeConfig, registrar: Arc<TestRegistrar>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ready_tx, ready) = watch::channel(false);
    let metrics = ServeMetrics::new(&Registry::new());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let registration = ShimRegistration {
        mode: "serve".into(),
        address: addr.to_string(),
        ..ShimRegistration::default()
    };
    let task = tokio::spawn(run(
        cfg,
        listener,
        registrar,
        registration,
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
        ready_tx,
    ));
    Running {
        addr,
        ready,
        metrics,
        stop: Some(stop),
        task,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Running {
    async fn request(&self, method: Method, target: &str, body: &'static str) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", self.addr))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        self.send(req).await
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let resp = tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .expect("an answer in time")
            .expect("the shim answers");
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn wait_ready(&mut self, want: bool) {
        tokio::time::timeout(DEADLINE, self.ready.wait_for(|r| *r == want))
            .await
            .unwrap_or_else(|_| panic!("ready never became {want}"))
            .unwrap();
    }

    fn restarts(&self, reason: &str) -> u64 {
        self.metrics.restarts.with_label_values(&[reason]).get()
    }

    fn shutdown(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }

    async fn finish(self) -> anyhow::Result<()> {
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("run returns in time")
            .unwrap()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown();
        self.finish().await
    }
}

/// Polls `cond` (async) until it holds, up to [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An in-test HTTP upstream (the worker process itself is a `sleep`):
/// `/healthz` follows `healthy`, `/slow` waits for `release`, anything
/// else answers `fast`. One request per connection, so a stopped
/// upstream is unreachable at once.
#[derive(Default)]
struct Upstream {
    healthy: AtomicBool,
    slow_started: Notify,
    release: Notify,
}

async fn start_upstream(state: Arc<Upstream>) -> (SocketAddr, JoinHandle<()>) {
    state.healthy.store(true, Ordering::SeqCst);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" if state.healthy.load(Ordering::SeqCst) => {
                            (StatusCode::OK, "ok")
                        }
                        "/healthz" => (StatusCode::INTERNAL_SERVER_ERROR, "sick"),
                        "/slow" => {
                            state.slow_started.notify_one();
                            state.release.notified().await;
                            (StatusCode::OK, "slow done")
                        }
                        _ => (StatusCode::OK, "fast"),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn not_ready_until_healthy_then_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let upstream = free_addr();
    // The worker waits for the test's go-ahead before it listens.
    let mut cfg = fast(ServeConfig::new(
        sh(
            r#"while [ ! -e "$GO" ]; do sleep 0.02; done; exec "$BACKEND" --listen "$ADDR" --name demo"#,
        ),
        upstream,
    ));
    cfg.env.insert("GO".into(), go.display().to_string());
    cfg.env.insert("BACKEND".into(), demo_backend());
    cfg.env.insert("ADDR".into(), upstream.to_string());
    let registrar = Arc::new(TestRegistrar::default());
    let mut shim = start(cfg, registrar.clone()).await;

    let early = shim.request(Method::GET, "/hello", "").await;
    assert_eq!(early.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(early.crank_error(), "worker-not-ready");
    assert_eq!(early.headers[header::RETRY_AFTER], "1");
    assert_eq!(early.json()["error"], "worker-not-ready");
    let message = early.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("/healthz"),
        "the one error body: {message}"
    );
    assert!(
        !early.body[..early.body.len() - 1].contains(&b'\n'),
        "one line"
    );
    assert!(registrar.events().is_empty(), "registered before healthy");

    std::fs::write(&go, "").unwrap();
    shim.wait_ready(true).await;
    assert_eq!(registrar.events(), ["register serve"]);
    assert_eq!(shim.metrics.ready.get(), 1);
    assert_eq!(shim.metrics.up.get(), 1);

    let req = Request::post(format!("http://{}/echo/path?x=1&y=2", shim.addr))
        .header("x-test", "kept")
        .header(header::CONNECTION, "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .body(Full::new(Bytes::from_static(b"hello world")))
        .unwrap();
    let echo = shim.send(req).await;
    assert_eq!(echo.status, StatusCode::OK);
    let echo = echo.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/echo/path?x=1&y=2");
    assert_eq!(echo["body_bytes"], 11);
    assert_eq!(echo["headers"]["x-test"], "kept");
    assert_eq!(echo["headers"]["host"], shim.addr.to_string());
    assert!(echo["headers"].get("x-hop").is_none(), "{echo}");
    assert!(echo["headers"].get("connection").is_none(), "{echo}");

    // h2c with prior knowledge; the worker still gets HTTP/1.1.
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let resp = h2
        .request(
            Request::get(format!("http://{}/over-h2", shim.addr))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/over-h2");
    assert_eq!(echo["version"], "HTTP/1.1");

    let upgrade = Request::get(format!("http://{}/ws", shim.addr))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(Full::default())
        .unwrap();
    let upgrade = shim.send(upgrade).await;
    assert_eq!(upgrade.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(upgrade.json()["error"], "upgrade-not-supported");

    let requests = |class: &str| shim.metrics.requests.with_label_values(&[class]).get();
    assert_eq!(requests("2xx"), 2);
    assert_eq!(requests("5xx"), 2);
    assert_eq!(shim.metrics.inflight.get(), 0);

    shim.stop().await.unwrap();
    assert_eq!(registrar.events(), ["register serve", "deregister"]);
}

#[tokio::test]
async fn crashed_worker_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let upstream = free_addr();
    let mut cfg = fast(ServeConfig::new(
        sh(r#"echo $$ > "$PIDFILE"; exec "$BACKEND" --listen "$ADDR" --name demo"#),
        upstream,
    ));
    cfg.env
        .insert("PIDFILE".into(), pidfile.display().to_string());
    cfg.env.insert("BACKEND".into(), demo_backend());
    cfg.env.insert("ADDR".into(), upstream.to_string());
    let registrar = Arc::new(TestRegistrar::default());
    let mut shim = start(cfg, registrar.clone()).await;
    shim.wait_ready(true).await;
    let first = read_pid(&pidfile).expect("the worker wrote its pid");

    // SAFETY: sending a signal to the worker this test started.
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    eventually("the worker restarted", || async {
        shim.restarts("exited") == 1
            && *shim.ready.borrow()
            && read_pid(&pidfile).is_some_and(|pid| pid != first)
    })
    .await;
    let answer = shim.request(Method::GET, "/again", "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/again");
    assert_eq!(shim.restarts("unhealthy"), 0);
    assert_eq!(registrar.events(), ["register serve"], "registered once");
    let second = read_pid(&pidfile).unwrap();

    shim.stop().await.unwrap();
    assert!(!alive(second), "the worker is gone");
}

#[tokio::test]
async fn worker_never_healthy_is_restarted_after_startup_timeout() {
    let mut cfg = fast(ServeConfig::new(sh("exec sleep 1000"), free_addr()));
    cfg.startup_timeout = Duration::from_millis(200);
    let mut shim = start(cfg, Arc::new(TestRegistrar::default())).await;
    eventually("a startup_timeout restart", || async {
        shim.restarts("startup_timeout") >= 1
    })
    .await;
    assert!(!*shim.ready.borrow_and_update());
    let answer = shim.request(Method::GET, "/", "").await;
    assert_eq!(answer.crank_error(), "worker-not-ready");
    shim.stop().await.unwrap();
}

#[tokio::test]
async fn exiting_worker_is_restarted_each_time() {
    let cfg = fast(ServeConfig::new(sh("exit 3"), free_addr()));
    let shim = start(cfg, Arc::new(TestRegistrar::default())).await;
    eventually("two restarts", || async { shim.restarts("exited") >= 2 }).await;
    assert!(!*shim.ready.borrow());
    shim.stop().await.unwrap();
}

#[tokio::test]
async fn missing_program_is_an_error() {
    let cfg = ServeConfig::new(vec!["/nonexistent/crank-worker".into()], free_addr());
    let shim = start(cfg, Arc::new(TestRegistrar::default())).await;
    let err = shim.finish().await.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/crank-worker"), "{err}");
}

#[tokio::test]
async fn unhealthy_worker_is_not_ready_then_restarted() {
    let state = Arc::new(Upstream::default());
    let (upstream, _server) = start_upstream(state.clone()).await;
    let mut cfg = fast(ServeConfig::new(sh("exec sleep 1000"), upstream));
    cfg.failure_threshold = 2;
    cfg.unhealthy_restart_after = Duration::from_millis(300);
    let mut shim = start(cfg, Arc::new(TestRegistrar::default())).await;
    shim.wait_ready(true).await;

    state.healthy.store(false, Ordering::SeqCst);
    shim.wait_ready(false).await;
    let answer = shim.request(Method::GET, "/", "").await;
    assert_eq!(answer.crank_error(), "worker-not-ready");
    eventually("an unhealthy restart", || async {
        shim.restarts("unhealthy") == 1
    })
    .await;

    state.healthy.store(true, Ordering::SeqCst);
    shim.wait_ready(true).await;
    assert_eq!(shim.request(Method::GET, "/", "").await.body, "fast");
    shim.stop().await.unwrap();
}

#[tokio::test]
async fn unreachable_worker_gives_502() {
    let state = Arc::new(Upstream::default());
    let (upstream, server) = start_upstream(state).await;
    let mut cfg = fast(ServeConfig::new(sh("exec sleep 1000"), upstream));
    cfg.failure_threshold = 10_000; // stays ready while the upstream is gone
    let mut shim = start(cfg, Arc::new(TestRegistrar::default())).await;
    shim.wait_ready(true).await;
    server.abort();
    let _ = server.await;

    let answer = shim.request(Method::GET, "/", "").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.crank_error(), "worker-unreachable");
    assert_eq!(answer.json()["error"], "worker-unreachable");
    shim.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_stop_deregisters_drains_then_stops_worker() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let termfile = dir.path().join("term");
    let state = Arc::new(Upstream::default());
    let (upstream, _server) = start_upstream(state.clone()).await;
    // The worker process notes its SIGTERM; the HTTP side is in-test.
    let mut cfg = fast(ServeConfig::new(
        sh(
            r#"trap 'echo term > "$TERMFILE"; exit 0' TERM; echo $$ > "$PIDFILE.tmp"; mv "$PIDFILE.tmp" "$PIDFILE"; sleep 1000 & wait"#,
        ),
        upstream,
    ));
    cfg.env
        .insert("PIDFILE".into(), pidfile.display().to_string());
    cfg.env
        .insert("TERMFILE".into(), termfile.display().to_string());

    let probe = {
        let (pidfile, termfile) = (pidfile.clone(), termfile.clone());
        move || {
            let alive = read_pid(&pidfile).is_some_and(alive);
            format!(" worker_alive={alive} sigterm={}", termfile.exists())
        }
    };
    let registrar = Arc::new(TestRegistrar {
        probe: Some(Box::new(probe)),
        ..TestRegistrar::default()
    });
    let mut shim = start(cfg, registrar.clone()).await;
    shim.wait_ready(true).await;
    // The pid file appears once the worker's SIGTERM trap is set.
    eventually("the worker's pid file", || async { pidfile.exists() }).await;
    let pid = read_pid(&pidfile).expect("the worker wrote its pid");

    let slow = {
        let client = shim.client.clone();
        let uri = format!("http://{}/slow", shim.addr);
        tokio::spawn(async move {
            let resp = client
                .request(Request::get(uri).body(Full::default()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        })
    };
    tokio::time::timeout(DEADLINE, state.slow_started.notified())
        .await
        .expect("the slow request reached the upstream");
    assert_eq!(shim.metrics.inflight.get(), 1);

    shim.shutdown();
    eventually("new requests are refused while draining", || async {
        shim.request(Method::GET, "/fast", "").await.crank_error() == "worker-draining"
    })
    .await;
    let draining = shim.request(Method::GET, "/fast", "").await;
    assert_eq!(draining.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(draining.headers[header::RETRY_AFTER], "1");
    assert_eq!(draining.json()["error"], "worker-draining");
    assert!(!*shim.ready.borrow(), "not ready while draining");
    assert_eq!(
        registrar.events(),
        [
            "register serve",
            "deregister worker_alive=true sigterm=false"
        ]
    );
    assert!(
        !shim.task.is_finished(),
        "run waits for the in-flight request"
    );
    assert!(
        alive(pid) && !termfile.exists(),
        "the worker runs until drained"
    );

    state.release.notify_one();
    let (status, body) = tokio::time::timeout(DEADLINE, slow).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow done");

    let metrics = shim.metrics.clone();
    shim.finish().await.unwrap();
    assert!(termfile.exists(), "the worker got SIGTERM");
    assert!(!alive(pid), "the worker is gone");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ESRCH)
    );
    assert_eq!(metrics.inflight.get(), 0);
    assert_eq!(metrics.up.get(), 0);
    assert_eq!(metrics.ready.get(), 0);
}
