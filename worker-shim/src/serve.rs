//! `serve` mode: the worker is an unmodified HTTP server. The shim starts it,
//! supervises it and sits in front of it.
//!
//! * **Supervisor.** The worker runs in its own process group with the
//!   shim's stdout and stderr. It is not ready until `GET health_path`
//!   answers 2xx; then the shim registers (once per shim lifetime) and
//!   reports ready. A worker that exits, never becomes healthy within
//!   `startup_timeout`, or stays unhealthy (`failure_threshold` failed checks
//!   in a row) for `unhealthy_restart_after` is stopped and restarted after
//!   an exponential backoff with jitter ([`backoff_delay`]); the backoff
//!   resets once a worker has stayed healthy for [`BACKOFF_RESET_AFTER`].
//! * **Front proxy.** HTTP/1.1 and h2c on the shim's listener, forwarded to
//!   `upstream` over pooled HTTP/1.1 connections with both bodies streamed.
//!   Hop-by-hop headers are dropped, `Host` is kept. Upgrades (WebSocket) and
//!   `CONNECT` get `501`. While the worker is not ready, or the shim drains:
//!   `503` with `Retry-After: 1`, `x-crank-error: worker-not-ready` (or
//!   `worker-draining`) and a one-line JSON body. When the worker cannot be
//!   reached: `502 x-crank-error: worker-unreachable`.
//! * **Graceful stop.** When the caller's `shutdown` future resolves:
//!   deregister, drain (new requests get `503 worker-draining`; in-flight ones
//!   finish, bounded by `drain_timeout`), `SIGTERM` the worker's process
//!   group, `SIGKILL` it after `stop_timeout`, return.

use std::future::Future;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::registration::{Registrar, ShimRegistration};

/// A worker that stayed healthy this long before it stopped restarts after
/// the initial backoff again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// Each backoff delay is shortened by a random share of up to this much.
const BACKOFF_JITTER: f64 = 0.2;
/// Bound on one `register` or `deregister` call.
const REGISTRAR_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a health check's answer is read (so the connection is reused).
const HEALTH_BODY_LIMIT: usize = 64 * 1024;
/// After the drain, how long idle client connections get to close.
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The `serve` mode's metrics. Cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct ServeMetrics {
    /// `crank_worker_up`: 1 while a worker process runs.
    pub up: IntGauge,
    /// `crank_worker_ready`: 1 while requests are forwarded.
    pub ready: IntGauge,
    /// `crank_worker_restarts_total{reason="exited"|"unhealthy"|"startup_timeout"}`.
    pub restarts: IntCounterVec,
    /// `crank_worker_inflight_requests`: forwarded requests whose response
    /// body has not finished.
    pub inflight: IntGauge,
    /// `crank_worker_requests_total{code_class="2xx"|…}`: every answer of
    /// the front proxy, the shim's own 501/502/503 included.
    pub requests: IntCounterVec,
}

impl ServeMetrics {
    /// Registers the metrics in `reg`.
    ///
    /// # Panics
    /// When `reg` already has metrics of these names (a programming error).
    pub fn new(reg: &Registry) -> Self {
        let up = IntGauge::new("crank_worker_up", "1 while the worker process runs").unwrap();
        let ready = IntGauge::new(
            "crank_worker_ready",
            "1 while the worker is healthy and registered and requests are forwarded",
        )
        .unwrap();
        let restarts = IntCounterVec::new(
            Opts::new(
                "crank_worker_restarts_total",
                "Worker restarts by reason: exited, unhealthy, startup_timeout",
            ),
            &["reason"],
        )
        .unwrap();
        let inflight = IntGauge::new(
            "crank_worker_inflight_requests",
            "Requests forwarded to the worker whose response has not finished",
        )
        .unwrap();
        let requests = IntCounterVec::new(
            Opts::new(
                "crank_worker_requests_total",
                "Requests answered by the serve-mode proxy, by status class",
            ),
            &["code_class"],
        )
        .unwrap();
        for reason in ["exited", "unhealthy", "startup_timeout"] {
            restarts.with_label_values(&[reason]);
        }
        for c in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ready.clone()),
            Box::new(restarts.clone()),
            Box::new(inflight.clone()),
            Box::new(requests.clone()),
        ] {
            reg.register(c)
                .expect("the serve metrics are registered once per registry");
        }
        ServeMetrics {
            up,
            ready,
            restarts,
            inflight,
            requests,
        }
    }
}

/// The delay before restart number `attempt + 1` (0-based `attempt`):
/// `initial * 2^attempt`, capped at `max`, then shortened by up to 20%
/// (`jitter` in `[0, 1)` picks how much; the supervisor passes a random one).
pub fn backoff_delay(initial: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let base = initial
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(max);
    base.mul_f64(1.0 - BACKOFF_JITTER * jitter.clamp(0.0, 1.0))
}

/// Consecutive restarts and their delays.
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// The delay before the next start, for a worker that had been healthy
    /// for `healthy_for` when it stopped.
    fn next(&mut self, healthy_for: Duration, jitter: f64) -> Duration {
        if healthy_for >= BACKOFF_RESET_AFTER {
            self.attempt = 0;
        }
        let delay = backoff_delay(self.initial, self.max, self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

/// Runs `serve` mode until `shutdown` resolves, then stops gracefully (see
/// the module docs) and returns `Ok`.
///
/// `ready_tx` carries readiness for the shim's `/ready` (the caller keeps
/// the receiver of a `watch::channel(false)`). `registrar.register` is
/// called once, when the worker first turns healthy;
/// `registrar.deregister` first thing on shutdown.
///
/// Errors: an invalid config, a listener bound to `upstream` itself, or a
/// worker program that cannot be started at all (not found, not
/// executable). A worker that crashes is restarted, never an error.
pub async fn run(
    cfg: ServeConfig,
    listener: TcpListener,
    registrar: Arc<dyn Registrar>,
    registration: ShimRegistration,
    metrics: ServeMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready_tx: watch::Sender<bool>,
) -> anyhow::Result<()> {
    cfg.validate()
        .map_err(|e| anyhow!("invalid serve config: {e}"))?;
    let local = listener
        .local_addr()
        .context("the serve listener's address")?;
    if local == cfg.upstream {
        anyhow::bail!(
            "serve.upstream {} is the shim's own listener; point it at the worker's address",
            cfg.upstream
        );
    }
    let shared = Arc::new(Shared::new(cfg, metrics, ready_tx));
    shared.set_ready(false);
    tracing::info!(listen = %local, upstream = %shared.cfg.upstream, "serve mode: starting the worker");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisor = tokio::spawn(supervise(
        shared.clone(),
        registrar.clone(),
        registration,
        stop_rx.clone(),
    ));
    let proxy = tokio::spawn(serve_proxy(listener, shared.clone(), stop_rx));

    tokio::pin!(shutdown);
    tokio::select! {
        biased;
        () = &mut shutdown => {}
        res = &mut supervisor => {
            // The supervisor returns early only on a fatal error.
            stop_tx.send_replace(true);
            shared.set_ready(false);
            let _ = proxy.await;
            return Err(joined(res).err().unwrap_or_else(|| anyhow!("the worker supervisor stopped")));
        }
    }

    tracing::info!("serve mode: stopping; deregistering");
    match tokio::time::timeout(REGISTRAR_TIMEOUT, registrar.deregister()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "deregistration failed"),
        Err(_) => tracing::warn!(timeout = ?REGISTRAR_TIMEOUT, "deregistration timed out"),
    }

    shared.draining.store(true, Ordering::SeqCst);
    shared.set_ready(false);
    let mut inflight = shared.inflight.subscribe();
    let left = *inflight.borrow();
    tracing::info!(inflight = left, timeout = ?shared.cfg.drain_timeout, "draining");
    let drained = tokio::time::timeout(shared.cfg.drain_timeout, inflight.wait_for(|n| *n == 0))
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            inflight = *shared.inflight.borrow(),
            timeout = ?shared.cfg.drain_timeout,
            "drain timed out; stopping the worker with requests in flight"
        );
    }

    stop_tx.send_replace(true);
    let stopped = joined(supervisor.await);
    let _ = proxy.await;
    tracing::info!("serve mode: stopped");
    stopped
}

fn joined(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.map_err(|e| anyhow!("the worker supervisor task failed: {e}"))?
}

/// What the supervisor and the proxy share.
struct Shared {
    cfg: ServeConfig,
    metrics: ServeMetrics,
    ready: watch::Sender<bool>,
    draining: AtomicBool,
    /// Forwarded requests whose response body has not finished.
    inflight: watch::Sender<usize>,
    client: Client<HttpConnector, Incoming>,
    health_client: Client<HttpConnector, Empty<Bytes>>,
    /// `http://<upstream>`
    upstream_base: String,
    health_uri: Uri,
}

impl Shared {
    fn new(cfg: ServeConfig, metrics: ServeMetrics, ready: watch::Sender<bool>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector.clone());
        let health_client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        let upstream_base = format!("http://{}", cfg.upstream);
        let health_uri = format!("{upstream_base}{}", cfg.health_path)
            .parse()
            .expect("a validated health_path makes a valid URI");
        Shared {
            cfg,
            metrics,
            ready,
            draining: AtomicBool::new(false),
            inflight: watch::channel(0).0,
            client,
            health_client,
            upstream_base,
            health_uri,
        }
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sets readiness (never `true` once draining); true when it changed.
    fn set_ready(&self, want: bool) -> bool {
        self.ready.send_if_modified(|ready| {
            let value = want && !self.draining();
            self.metrics.ready.set(i64::from(value));
            let changed = *ready != value;
            *ready = value;
            changed
        })
    }

    /// `Ok` when the worker's health check answers 2xx in time.
    async fn check_health(&self) -> Result<(), String> {
        let req = Request::get(self.health_uri.clone())
            .header(header::USER_AGENT, "crank-shim-health")
            .body(Empty::new())
            .expect("a valid health request");
        let check = async {
            let resp = self
                .health_client
                .request(req)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = resp.status();
            let _ = Limited::new(resp.into_body(), HEALTH_BODY_LIMIT)
                .collect()
                .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        };
        match tokio::time::timeout(self.cfg.health_timeout, check).await {
            Ok(res) => res,
            Err(_) => Err(format!("no answer within {:?}", self.cfg.health_timeout)),
        }
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// Supervisor

/// Why the watch over one worker process ended.
enum Outcome {
    Stopped,
    Exited(std::io::Result<ExitStatus>),
    Unhealthy,
    StartupTimeout,
}

/// Kills the worker's process group with `SIGKILL` when dropped armed (the
/// supervisor task was dropped or panicked).
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg has no memory-safety preconditions; an unknown group
    // only yields ESRCH.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

fn spawn_worker(cfg: &ServeConfig) -> std::io::Result<Child> {
    let mut cmd = Command::new(&cfg.command[0]);
    cmd.args(&cfg.command[1..])
        .envs(&cfg.env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
}

/// Waits `delay`; true when a stop came first.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// `SIGTERM` to the group, `SIGKILL` after `grace`; then `SIGKILL` to
/// whatever is left of the group.
async fn terminate(child: &mut Child, pgid: u32, grace: Duration) -> Option<ExitStatus> {
    signal_group(pgid, libc::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(res) => res.ok(),
        Err(_) => {
            tracing::warn!(
                pid = pgid,
                ?grace,
                "worker did not stop after SIGTERM; sending SIGKILL"
            );
            signal_group(pgid, libc::SIGKILL);
            child.wait().await.ok()
        }
    };
    signal_group(pgid, libc::SIGKILL);
    status
}

fn describe(status: Option<&ExitStatus>) -> String {
    status.map_or_else(|| "unknown".to_string(), ToString::to_string)
}

/// Starts the worker and restarts it until a stop; `Err` only when the
/// program cannot be started at all.
async fn supervise(
    shared: Arc<Shared>,
    registrar: Arc<dyn Registrar>,
    registration: ShimRegistration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cfg = &shared.cfg;
    let mut backoff = Backoff {
        initial: cfg.restart_backoff_initial,
        max: cfg.restart_backoff_max,
        attempt: 0,
    };
    let mut registered = false;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut child = match spawn_worker(cfg) {
            Ok(child) => child,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                return Err(anyhow!(
                    "starting the worker {:?}: {e} (check serve.command)",
                    cfg.command[0]
                ));
            }
            Err(e) => {
                let delay = backoff.next(Duration::ZERO, rand::random());
                tracing::error!(error = %e, ?delay, "starting the worker failed; retrying");
                if sleep_or_stop(delay, &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        let mut guard = GroupGuard {
            pgid: pid,
            armed: pid != 0,
        };
        shared.metrics.up.set(1);
        tracing::info!(pid, command = ?cfg.command, "worker started");

        let (outcome, healthy_for) = watch_worker(
            &shared,
            &mut child,
            &mut stop,
            &*registrar,
            &registration,
            &mut registered,
        )
        .await;
        let (reason, status) = match outcome {
            Outcome::Stopped => {
                let status = terminate(&mut child, pid, cfg.stop_timeout).await;
                guard.armed = false;
                shared.metrics.up.set(0);
                tracing::info!(pid, status = %describe(status.as_ref()), "worker stopped");
                return Ok(());
            }
            Outcome::Exited(status) => {
                // Whatever the worker left behind in its group goes too.
                signal_group(pid, libc::SIGKILL);
                ("exited", status.ok())
            }
            Outcome::Unhealthy => (
                "unhealthy",
                terminate(&mut child, pid, cfg.stop_timeout).await,
            ),
            Outcome::StartupTimeout => (
                "startup_timeout",
                terminate(&mut child, pid, cfg.stop_timeout).await,
            ),
        };
        guard.armed = false;
        shared.set_ready(false);
        shared.metrics.up.set(0);
        if shared.draining() {
            tracing::warn!(pid, status = %describe(status.as_ref()), reason, "worker stopped while draining; not restarting it");
            let _ = stop.wait_for(|s| *s).await;
            return Ok(());
        }
        shared.metrics.restarts.with_label_values(&[reason]).inc();
        let delay = backoff.next(healthy_for, rand::random());
        tracing::warn!(
            pid,
            status = %describe(status.as_ref()),
            reason,
            ?delay,
            "worker stopped; restarting it after the backoff"
        );
        if sleep_or_stop(delay, &mut stop).await {
            return Ok(());
        }
    }
}

/// Health-checks one worker process until it exits, must be restarted or a
/// stop comes. Also returns how long it had been healthy without a break.
async fn watch_worker(
    shared: &Shared,
    child: &mut Child,
    stop: &mut watch::Receiver<bool>,
    registrar: &dyn Registrar,
    registration: &ShimRegistration,
    registered: &mut bool,
) -> (Outcome, Duration) {
    let cfg = &shared.cfg;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(cfg.health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen_healthy = false;
    let mut failures = 0u32;
    let mut unhealthy_since: Option<Instant> = None;
    let mut healthy_since: Option<Instant> = None;
    let streak = |since: Option<Instant>| since.map_or(Duration::ZERO, |t| t.elapsed());
    loop {
        let checked = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return (Outcome::Stopped, streak(healthy_since)),
            status = child.wait() => return (Outcome::Exited(status), streak(healthy_since)),
            res = async {
                ticker.tick().await;
                shared.check_health().await
            } => res,
        };
        match checked {
            Ok(()) => {
                failures = 0;
                unhealthy_since = None;
                healthy_since.get_or_insert_with(Instant::now);
                if !seen_healthy {
                    seen_healthy = true;
                    tracing::info!(after = ?started.elapsed(), "worker is healthy");
                }
                if *shared.ready.borrow() || shared.draining() {
                    continue;
                }
                if !*registered {
                    *registered = register(registrar, registration).await;
                }
                if *registered && shared.set_ready(true) {
                    tracing::info!("worker is ready");
                }
            }
            Err(why) => {
                failures = failures.saturating_add(1);
                if !seen_healthy {
                    if started.elapsed() >= cfg.startup_timeout {
                        tracing::warn!(timeout = ?cfg.startup_timeout, last = %why, "worker did not become healthy in time");
                        return (Outcome::StartupTimeout, Duration::ZERO);
                    }
                    tracing::debug!(last = %why, "worker not healthy yet");
                    continue;
                }
                if failures < cfg.failure_threshold {
                    tracing::debug!(failures, last = %why, "worker health check failed");
                    continue;
                }
                healthy_since = None;
                let since = *unhealthy_since.get_or_insert_with(Instant::now);
                if shared.set_ready(false) {
                    tracing::warn!(failures, last = %why, "worker is unhealthy; not ready");
                }
                if since.elapsed() >= cfg.unhealthy_restart_after && !shared.draining() {
                    tracing::warn!(after = ?cfg.unhealthy_restart_after, "worker stayed unhealthy");
                    return (Outcome::Unhealthy, Duration::ZERO);
                }
            }
        }
    }
}

async fn register(registrar: &dyn Registrar, registration: &ShimRegistration) -> bool {
    match tokio::time::timeout(REGISTRAR_TIMEOUT, registrar.register(registration)).await {
        Ok(Ok(())) => {
            tracing::info!(address = %registration.address, "registered");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "registration failed; not ready, retrying at the next health check");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?REGISTRAR_TIMEOUT, "registration timed out; not ready, retrying at the next health check");
            false
        }
    }
}

// ---------------------------------------------------------------------------
// Front proxy

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Accepts connections until a stop, then lets them close (briefly).
async fn serve_proxy(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    crate::listener::serve(
        listener,
        move |req| proxy(shared.clone(), req),
        stop,
        CONNECTION_CLOSE_GRACE,
    )
    .await
}

async fn proxy(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    let resp = forward(&shared, req).await;
    let class = match resp.status().as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    };
    shared.metrics.requests.with_label_values(&[class]).inc();
    resp
}

async fn forward(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    if shared.draining() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker-draining",
            "this instance is shutting down; retry on another one",
        );
    }
    if !*shared.ready.borrow() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker-not-ready",
            &format!(
                "the worker is starting, restarting or failing its health check ({})",
                shared.cfg.health_path
            ),
        );
    }
    if is_upgrade(&req) {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "upgrade-not-supported",
            "protocol upgrades (WebSocket) and CONNECT are not supported in serve mode",
        );
    }

    let guard = InflightGuard::new(shared.clone());
    let (mut parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = match format!("{}{target}", shared.upstream_base).parse() {
        Ok(uri) => uri,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad-request-target",
                &format!("the request target cannot be forwarded: {e}"),
            )
        }
    };
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

    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = Tracked {
                inner: body,
                guard: Some(guard),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) if e.is_connect() => error_response(
            StatusCode::BAD_GATEWAY,
            "worker-unreachable",
            &format!(
                "connecting to the worker at {} failed: {}",
                shared.cfg.upstream,
                error_chain(&e)
            ),
        ),
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            "worker-error",
            &format!("the worker's response failed: {}", error_chain(&e)),
        ),
    }
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

const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Drops the hop-by-hop headers and those that `Connection` names (never
/// `Host`).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The shim's own answers: `{"error":"<code>","detail":"…"}`, the code also
/// in `x-crank-error`; 503s say `Retry-After: 1`.
fn error_response(status: StatusCode, code: &'static str, detail: &str) -> Response<ProxyBody> {
    let mut body = serde_json::json!({ "error": code, "detail": detail }).to_string();
    body.push('\n');
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-crank-error", code);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp = resp.header(header::RETRY_AFTER, "1");
    }
    resp.body(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    )
    .expect("a valid error response")
}

/// Counts one forwarded request from its arrival until its response body
/// finishes or is dropped.
struct InflightGuard(Arc<Shared>);

impl InflightGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.inflight.send_modify(|n| *n += 1);
        shared.metrics.inflight.inc();
        InflightGuard(shared)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.send_modify(|n| *n = n.saturating_sub(1));
        self.0.metrics.inflight.dec();
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use hyper::service::service_fn;
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
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
            })
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
                        let mut resp =
                            Response::new(Full::new(Bytes::from_static(body.as_bytes())));
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

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let (initial, max) = (Duration::from_millis(250), Duration::from_secs(30));
        let schedule: Vec<u64> = (0..10)
            .map(|n| backoff_delay(initial, max, n, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(
            schedule,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff_delay(initial, max, u32::MAX, 0.0), max);
        // Jitter shortens a delay by at most 20%.
        assert_eq!(
            backoff_delay(initial, max, 2, 1.0),
            Duration::from_millis(800)
        );
        let jittered = backoff_delay(initial, max, 2, 0.5);
        assert!(jittered > Duration::from_millis(800) && jittered < Duration::from_secs(1));

        let mut backoff = Backoff {
            initial,
            max,
            attempt: 0,
        };
        let mut next = |healthy_for| backoff.next(healthy_for, 0.0).as_millis();
        assert_eq!(next(Duration::ZERO), 250);
        assert_eq!(next(Duration::from_secs(29)), 500);
        assert_eq!(next(Duration::ZERO), 1000);
        assert_eq!(next(BACKOFF_RESET_AFTER), 250, "reset after a healthy run");
        assert_eq!(next(Duration::ZERO), 500);
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: ServeConfig =
            serde_yaml::from_str("command: [my-server]\nupstream: 127.0.0.1:8080\n").unwrap();
        assert_eq!(cfg.health_path, "/healthz");
        assert_eq!(cfg.health_interval, Duration::from_secs(1));
        assert_eq!(cfg.health_timeout, Duration::from_secs(1));
        assert_eq!(cfg.startup_timeout, Duration::from_secs(60));
        assert_eq!(cfg.failure_threshold, 3);
        assert_eq!(cfg.unhealthy_restart_after, Duration::from_secs(10));
        assert_eq!(cfg.restart_backoff_initial, Duration::from_millis(250));
        assert_eq!(cfg.restart_backoff_max, Duration::from_secs(30));
        assert_eq!(cfg.drain_timeout, Duration::from_secs(30));
        assert_eq!(cfg.stop_timeout, Duration::from_secs(10));
        cfg.validate().unwrap();

        let cfg: ServeConfig = serde_yaml::from_str(
            "command: [my-server]\nupstream: 127.0.0.1:8080\nhealth_interval: 500ms\n",
        )
        .unwrap();
        assert_eq!(cfg.health_interval, Duration::from_millis(500));
        let unknown = serde_yaml::from_str::<ServeConfig>(
            "command: [x]\nupstream: 127.0.0.1:8080\nhealth_pth: /h\n",
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("health_pth"), "{unknown}");

        let base = ServeConfig::new(vec!["my-server".into()], "127.0.0.1:8080".parse().unwrap());
        let error = |edit: fn(&mut ServeConfig)| {
            let mut cfg = base.clone();
            edit(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert!(error(|c| c.command.clear()).contains("serve.command is empty"));
        assert!(error(|c| c.command[0] = " ".into()).contains("serve.command[0]"));
        assert!(error(|c| c.upstream.set_port(0)).contains("serve.upstream"));
        assert!(error(|c| c.health_path = "healthz".into()).contains("serve.health_path"));
        assert!(error(|c| c.health_interval = Duration::ZERO).contains("serve.health_interval"));
        assert!(error(|c| c.health_timeout = Duration::ZERO).contains("serve.health_timeout"));
        assert!(error(|c| c.failure_threshold = 0).contains("serve.failure_threshold"));
        assert!(error(|c| {
            c.env.insert("A=B".into(), "x".into());
        })
        .contains("serve.env"));
        let backoff = error(|c| c.restart_backoff_max = Duration::from_millis(100));
        assert!(backoff.contains("serve.restart_backoff_max"), "{backoff}");
        let both = error(|c| {
            c.command.clear();
            c.startup_timeout = Duration::ZERO;
        });
        assert!(
            both.contains("serve.command") && both.contains("serve.startup_timeout"),
            "{both}"
        );
    }
}
