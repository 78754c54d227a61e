//! Is the worker healthy: the `GET health_path` check ([`Checker`]) and
//! what a series of checks means for one worker process ([`Streaks`]): not
//! yet healthy, healthy, failing, unhealthy for long enough to restart.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error_chain;
use crate::config::ServeConfig;

/// How much of a health check's answer is read (so the connection is reused).
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// Calls the worker's health path over one pooled connection.
pub(super) struct Checker {
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: Uri,
    timeout: Duration,
}

impl Checker {
    pub(super) fn new(cfg: &ServeConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        let uri = format!("http://{}{}", cfg.upstream, cfg.health_path)
            .parse()
            .expect("a validated health_path makes a valid URI");
        Checker {
            client,
            uri,
            timeout: cfg.health_timeout,
        }
    }

    /// `Ok` when the worker's health check answers 2xx in time.
    pub(super) async fn check(&self) -> Result<(), String> {
        let req = Request::get(self.uri.clone())
            .header(header::USER_AGENT, "crank-shim-health")
            .body(Empty::new())
            .expect("a valid health request");
        let check = async {
            let resp = self
                .client
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
        match tokio::time::timeout(self.timeout, check).await {
            Ok(res) => res,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

/// What a failed check means for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failing {
    /// Not healthy yet, within `startup_timeout`; or fewer than
    /// `failure_threshold` failures in a row: nothing changes.
    Tolerated,
    /// Unhealthy: not ready, not yet for long enough to restart.
    Unhealthy,
    /// Unhealthy for `unhealthy_restart_after`: restart it.
    Restart,
    /// Never healthy within `startup_timeout`: restart it.
    StartupTimeout,
}

/// The health history of one worker process.
pub(super) struct Streaks {
    started: Instant,
    seen_healthy: bool,
    failures: u32,
    unhealthy_since: Option<Instant>,
    healthy_since: Option<Instant>,
}

impl Streaks {
    pub(super) fn new(started: Instant) -> Self {
        Streaks {
            started,
            seen_healthy: false,
            failures: 0,
            unhealthy_since: None,
            healthy_since: None,
        }
    }

    /// How long the worker has been healthy without a break.
    pub(super) fn healthy_for(&self) -> Duration {
        self.healthy_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// A check passed; the time since the start when it is the worker's
    /// first.
    pub(super) fn passed(&mut self) -> Option<Duration> {
        self.failures = 0;
        self.unhealthy_since = None;
        self.healthy_since.get_or_insert_with(Instant::now);
        let first = !std::mem::replace(&mut self.seen_healthy, true);
        first.then(|| self.started.elapsed())
    }

    /// A check failed, at `now`.
    pub(super) fn failed(&mut self, cfg: &ServeConfig, now: Instant) -> Failing {
        self.failures = self.failures.saturating_add(1);
        if !self.seen_healthy {
            return match now.duration_since(self.started) >= cfg.startup_timeout {
                true => Failing::StartupTimeout,
                false => Failing::Tolerated,
            };
        }
        if self.failures < cfg.failure_threshold {
            return Failing::Tolerated;
        }
        self.healthy_since = None;
        let since = *self.unhealthy_since.get_or_insert(now);
        match now.duration_since(since) >= cfg.unhealthy_restart_after {
            true => Failing::Restart,
            false => Failing::Unhealthy,
        }
    }

    /// Failed checks in a row.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_mean_nothing_then_unhealthy_then_restart() {
        let mut cfg = ServeConfig::new(vec!["w".into()], "127.0.0.1:8080".parse().unwrap());
        cfg.startup_timeout = Duration::from_secs(60);
        cfg.failure_threshold = 2;
        cfg.unhealthy_restart_after = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);

        let mut s = Streaks::new(t0);
        assert_eq!(s.failed(&cfg, at(59)), Failing::Tolerated, "starting up");
        assert_eq!(s.failed(&cfg, at(60)), Failing::StartupTimeout);

        let mut s = Streaks::new(t0);
        assert!(s.passed().is_some(), "the first pass");
        assert_eq!(s.passed(), None);
        assert_eq!(s.failed(&cfg, at(1)), Failing::Tolerated, "below threshold");
        assert_eq!(s.failed(&cfg, at(2)), Failing::Unhealthy);
        assert_eq!(s.healthy_for(), Duration::ZERO);
        assert_eq!(s.failed(&cfg, at(11)), Failing::Unhealthy);
        assert_eq!(s.failed(&cfg, at(12)), Failing::Restart);
        assert_eq!(s.failures(), 4);
        s.passed();
        assert_eq!(s.failures(), 0);
        assert_eq!(s.failed(&cfg, at(13)), Failing::Tolerated, "counts anew");
    }
}
