//! `serve` mode: the worker is an unmodified HTTP server. The shim starts it,
//! supervises it and sits in front of it.
//!
//! * **Supervisor** (`supervisor`). The worker runs in its own process
//!   group with the shim's stdout and stderr. It is not ready until
//!   `GET health_path` answers 2xx; then the shim registers (once per shim
//!   lifetime) and reports ready. A worker that exits, never becomes healthy
//!   within `startup_timeout`, or stays unhealthy (`failure_threshold` failed
//!   checks in a row) for `unhealthy_restart_after` is stopped and restarted
//!   after an exponential backoff with jitter ([`restart_backoff`]); the
//!   backoff resets once a worker has stayed healthy for
//!   [`BACKOFF_RESET_AFTER`].
//! * **Front proxy** (`front`). HTTP/1.1 and h2c on the shim's listener,
//!   forwarded to `upstream` over pooled HTTP/1.1 connections with both
//!   bodies streamed. Hop-by-hop headers are dropped, `Host` is kept.
//!   Upgrades (WebSocket) and `CONNECT` get `501`. While the worker is not
//!   ready, or the shim drains: `503` with `Retry-After: 1`,
//!   `x-crank-error: worker-not-ready` (or `worker-draining`) and a one-line
//!   JSON body. When the worker cannot be reached:
//!   `502 x-crank-error: worker-unreachable`.
//! * **Graceful stop** ([`run`]). When the caller's `shutdown` future
//!   resolves: deregister, drain (new requests get `503 worker-draining`;
//!   in-flight ones finish, bounded by `drain_timeout`), `SIGTERM` the
//!   worker's process group, `SIGKILL` it after `stop_timeout`, return.
//!
//! `Shared` is what the supervisor and the front proxy share: the config,
//! the metrics, readiness, the drain flag and the in-flight count.

mod front;
mod health;
mod metrics;
mod supervisor;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use crank_plumbing::exit::chain as error_chain;
use crank_plumbing::Drain;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use self::metrics::ServeMetrics;
pub use self::supervisor::{restart_backoff, BACKOFF_RESET_AFTER};
use crate::config::ServeConfig;
use crate::registration::{Registrar, ShimRegistration};

/// Bound on one `register` or `deregister` call.
const REGISTRAR_TIMEOUT: Duration = Duration::from_secs(10);

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
    check(&cfg, &listener)?;
    let shared = Arc::new(Shared::new(cfg, metrics, ready_tx));
    shared.set_ready(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisor = tokio::spawn(supervisor::supervise(
        shared.clone(),
        registrar.clone(),
        registration,
        stop_rx.clone(),
    ));
    let proxy = tokio::spawn(front::serve(listener, shared.clone(), stop_rx));

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

    deregister(&*registrar).await;
    drain(&shared).await;
    stop_tx.send_replace(true);
    let stopped = joined(supervisor.await);
    let _ = proxy.await;
    tracing::info!("serve mode: stopped");
    stopped
}

/// The config is valid and the listener is not the worker's own address.
fn check(cfg: &ServeConfig, listener: &TcpListener) -> anyhow::Result<()> {
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
    tracing::info!(listen = %local, upstream = %cfg.upstream, "serve mode: starting the worker");
    Ok(())
}

/// The first step of a stop: callers stop being sent here.
async fn deregister(registrar: &dyn Registrar) {
    tracing::info!("serve mode: stopping; deregistering");
    match tokio::time::timeout(REGISTRAR_TIMEOUT, registrar.deregister()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "deregistration failed"),
        Err(_) => tracing::warn!(timeout = ?REGISTRAR_TIMEOUT, "deregistration timed out"),
    }
}

/// Refuses new requests and waits for those in flight, up to
/// `drain_timeout`.
async fn drain(shared: &Shared) {
    shared.drain.start();
    shared.set_ready(false);
    let timeout = shared.cfg.drain_timeout;
    tracing::info!(inflight = shared.drain.in_flight(), ?timeout, "draining");
    if !shared.drain.drain(timeout).await {
        tracing::warn!(
            inflight = shared.drain.in_flight(),
            ?timeout,
            "drain timed out; stopping the worker with requests in flight"
        );
    }
}

fn joined(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.map_err(|e| anyhow!("the worker supervisor task failed: {e}"))?
}

/// What the supervisor and the front proxy share.
struct Shared {
    cfg: ServeConfig,
    metrics: ServeMetrics,
    ready: watch::Sender<bool>,
    /// The stop flag, and the forwarded requests whose response body has
    /// not finished.
    drain: Drain,
}

impl Shared {
    fn new(cfg: ServeConfig, metrics: ServeMetrics, ready: watch::Sender<bool>) -> Self {
        Shared {
            cfg,
            metrics,
            ready,
            drain: Drain::new(),
        }
    }

    fn draining(&self) -> bool {
        self.drain.is_draining()
    }

    fn is_ready(&self) -> bool {
        *self.ready.borrow()
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
}
