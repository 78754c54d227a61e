//! The worker's life: start it in its own process group, watch its health,
//! register once it is healthy, and stop and restart it after a backoff
//! when it exits, never turns healthy or stays unhealthy.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use crank_plumbing::backoff::Attempts;
use crank_plumbing::{Backoff, Jitter};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::health::{Checker, Failing, Streaks};
use super::{Shared, REGISTRAR_TIMEOUT};
use crate::config::ServeConfig;
use crate::registration::{Registrar, ShimRegistration};

/// A worker that stayed healthy this long before it stopped restarts after
/// the initial backoff again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// The delays between restarts: `restart_backoff_initial` doubling up to
/// `restart_backoff_max`, each shortened by a random share of up to half
/// ([`Jitter::Equal`]).
pub fn restart_backoff(cfg: &ServeConfig) -> Backoff {
    Backoff::new(
        cfg.restart_backoff_initial,
        cfg.restart_backoff_max,
        Jitter::Equal,
    )
}

/// Why the watch over one worker process ended.
enum Outcome {
    Stopped,
    Exited(std::io::Result<ExitStatus>),
    Unhealthy,
    StartupTimeout,
}

/// What the supervisor does next.
#[derive(PartialEq)]
enum Next {
    Restart,
    Return,
}

/// Starts the worker and restarts it until a stop; `Err` only when the
/// program cannot be started at all.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    registrar: Arc<dyn Registrar>,
    registration: ShimRegistration,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut sup = Supervisor {
        checker: Checker::new(&shared.cfg),
        restarts: restart_backoff(&shared.cfg).attempts(),
        shared,
        registrar,
        registration,
        stop,
        registered: false,
    };
    while !*sup.stop.borrow() {
        let Some(child) = sup.start().await? else {
            continue;
        };
        if sup.run_once(child).await == Next::Return {
            break;
        }
    }
    Ok(())
}

struct Supervisor {
    shared: Arc<Shared>,
    checker: Checker,
    registrar: Arc<dyn Registrar>,
    registration: ShimRegistration,
    stop: watch::Receiver<bool>,
    restarts: Attempts,
    /// Registered once per shim lifetime, at the first healthy worker.
    registered: bool,
}

impl Supervisor {
    /// Starts the worker; `Ok(None)` after a failed start that may work
    /// later (waited out with the backoff).
    async fn start(&mut self) -> anyhow::Result<Option<Child>> {
        let cfg = &self.shared.cfg;
        match spawn_worker(cfg) {
            Ok(child) => Ok(Some(child)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                Err(anyhow!(
                    "starting the worker {:?}: {e} (check serve.command)",
                    cfg.command[0]
                ))
            }
            Err(e) => {
                let delay = self.restarts.next_delay();
                tracing::error!(error = %e, ?delay, "starting the worker failed; retrying");
                sleep_or_stop(delay, &mut self.stop).await;
                Ok(None)
            }
        }
    }

    /// One worker process, from its start to its end.
    async fn run_once(&mut self, mut child: Child) -> Next {
        let pid = child.id().unwrap_or(0);
        let mut guard = GroupGuard {
            pgid: pid,
            armed: pid != 0,
        };
        self.shared.metrics.up.set(1);
        tracing::info!(pid, command = ?self.shared.cfg.command, "worker started");
        let (outcome, healthy_for) = self.watch(&mut child).await;
        let stop_timeout = self.shared.cfg.stop_timeout;
        let (reason, status) = match outcome {
            Outcome::Stopped => {
                let status = terminate(&mut child, pid, stop_timeout).await;
                guard.armed = false;
                self.shared.metrics.up.set(0);
                tracing::info!(pid, status = %describe(status.as_ref()), "worker stopped");
                return Next::Return;
            }
            Outcome::Exited(status) => {
                // Whatever the worker left behind in its group goes too.
                signal_group(pid, libc::SIGKILL);
                ("exited", status.ok())
            }
            Outcome::Unhealthy => ("unhealthy", terminate(&mut child, pid, stop_timeout).await),
            Outcome::StartupTimeout => (
                "startup_timeout",
                terminate(&mut child, pid, stop_timeout).await,
            ),
        };
        guard.armed = false;
        self.shared.set_ready(false);
        self.shared.metrics.up.set(0);
        self.restart(pid, reason, status, healthy_for).await
    }

    /// After a worker ended on its own or was stopped as unhealthy: wait
    /// the backoff, unless the shim drains.
    async fn restart(
        &mut self,
        pid: u32,
        reason: &'static str,
        status: Option<ExitStatus>,
        healthy_for: Duration,
    ) -> Next {
        let status = describe(status.as_ref());
        if self.shared.draining() {
            tracing::warn!(pid, %status, reason, "worker stopped while draining; not restarting it");
            let _ = self.stop.wait_for(|s| *s).await;
            return Next::Return;
        }
        self.shared
            .metrics
            .restarts
            .with_label_values(&[reason])
            .inc();
        if healthy_for >= BACKOFF_RESET_AFTER {
            self.restarts.reset();
        }
        let delay = self.restarts.next_delay();
        tracing::warn!(pid, %status, reason, ?delay, "worker stopped; restarting it after the backoff");
        match sleep_or_stop(delay, &mut self.stop).await {
            true => Next::Return,
            false => Next::Restart,
        }
    }

    /// Health-checks one worker process until it exits, must be restarted
    /// or a stop comes. Also returns how long it had been healthy without a
    /// break.
    async fn watch(&mut self, child: &mut Child) -> (Outcome, Duration) {
        let mut streaks = Streaks::new(Instant::now());
        let mut ticker = tokio::time::interval(self.shared.cfg.health_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let checked = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => return (Outcome::Stopped, streaks.healthy_for()),
                status = child.wait() => return (Outcome::Exited(status), streaks.healthy_for()),
                res = async {
                    ticker.tick().await;
                    self.checker.check().await
                } => res,
            };
            let ended = match checked {
                Ok(()) => {
                    self.passed(&mut streaks).await;
                    None
                }
                Err(why) => self.failed(&mut streaks, &why),
            };
            if let Some(outcome) = ended {
                return (outcome, Duration::ZERO);
            }
        }
    }

    /// A passed check: register (once) and turn ready.
    async fn passed(&mut self, streaks: &mut Streaks) {
        if let Some(after) = streaks.passed() {
            tracing::info!(?after, "worker is healthy");
        }
        if self.shared.is_ready() || self.shared.draining() {
            return;
        }
        if !self.registered {
            self.registered = register(&*self.registrar, &self.registration).await;
        }
        if self.registered && self.shared.set_ready(true) {
            tracing::info!("worker is ready");
        }
    }

    /// A failed check; `Some` when the worker must be restarted.
    fn failed(&self, streaks: &mut Streaks, why: &str) -> Option<Outcome> {
        let cfg = &self.shared.cfg;
        let failing = streaks.failed(cfg, Instant::now());
        let failures = streaks.failures();
        match failing {
            Failing::StartupTimeout => {
                tracing::warn!(timeout = ?cfg.startup_timeout, last = %why, "worker did not become healthy in time");
                Some(Outcome::StartupTimeout)
            }
            Failing::Tolerated => {
                tracing::debug!(failures, last = %why, "worker health check failed");
                None
            }
            Failing::Unhealthy | Failing::Restart => {
                if self.shared.set_ready(false) {
                    tracing::warn!(failures, last = %why, "worker is unhealthy; not ready");
                }
                if failing == Failing::Unhealthy || self.shared.draining() {
                    return None;
                }
                tracing::warn!(after = ?cfg.unhealthy_restart_after, "worker stayed unhealthy");
                Some(Outcome::Unhealthy)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubling to the cap, each delay in [d/2, d]; the count starts over
    /// after a worker stayed healthy for [`BACKOFF_RESET_AFTER`].
    #[test]
    fn restarts_double_to_the_cap_with_jitter() {
        let cfg = ServeConfig::new(vec!["w".into()], "127.0.0.1:8080".parse().unwrap());
        let backoff = restart_backoff(&cfg);
        let schedule: Vec<u128> = (0..10).map(|n| backoff.delay(n, 1.0).as_millis()).collect();
        assert_eq!(
            schedule,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(backoff.delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(backoff.delay(u32::MAX, 1.0), Duration::from_secs(30));
    }
}
