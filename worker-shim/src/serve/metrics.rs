//! The `serve` mode's metrics: the worker process, its readiness and
//! restarts, and the front proxy's answers.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

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
