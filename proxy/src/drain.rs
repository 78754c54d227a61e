//! Drain on SIGTERM: readiness turns false first, listeners stop accepting,
//! in-flight requests get until the deadline, then the process exits 0.
//! SIGINT (Ctrl-C) drains the same way; a second signal exits at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use crank_plumbing::signal::Signals;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};

use crate::health::Health;

pub struct DrainSignal {
    pub health: Arc<Health>,
    pub deadline: Duration,
}

/// How long the in-flight count must stay at zero before exiting, so the
/// last responses leave the socket buffers.
const SETTLE: Duration = Duration::from_millis(200);

#[async_trait]
impl ShutdownSignalWatch for DrainSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                // Without handlers a SIGTERM kills the process undrained:
                // say so, and stop now rather than run unstoppable.
                tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        let which = signals.recv().await;
        self.health.start_draining();
        tracing::info!(signal = which, inflight = self.health.inflight(), deadline = ?self.deadline, "draining: readiness is false, no new connections");
        let health = self.health.clone();
        let deadline = self.deadline;
        std::thread::spawn(move || wait_and_exit(&health, deadline));
        tokio::spawn(async move {
            let which = signals.recv().await;
            tracing::warn!(signal = which, "second signal: exiting now");
            crate::logging::flush();
            std::process::exit(0);
        });
        ShutdownSignal::GracefulTerminate
    }
}

fn wait_and_exit(health: &Health, deadline: Duration) {
    let start = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if health.inflight() == 0 {
            let since = *idle_since.get_or_insert(now);
            if now - since >= SETTLE {
                tracing::info!(elapsed = ?start.elapsed(), "drained: no requests in flight, exiting");
                crate::tracing::export::flush(Duration::from_secs(2));
                crate::logging::flush();
                std::process::exit(0);
            }
        } else {
            idle_since = None;
        }
        if now - start >= deadline {
            tracing::warn!(
                inflight = health.inflight(),
                "drain deadline reached with requests in flight, exiting"
            );
            crate::tracing::export::flush(Duration::from_secs(2));
            crate::logging::flush();
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
