//! The capture listeners' metrics, registered in the proxy's registry when
//! the listeners are built:
//!
//! * `crank_capture_connections_total{direction, protocol, outcome}`: each
//!   captured connection once, with what detection made of it
//!   (`protocol` http1, h2, tls, opaque; `unknown` when refused before
//!   detection; `outcome` detected, timeout, skipped, closed, or refused
//!   for one refused before detection);
//! * `crank_capture_refused_total{direction, reason}`: connections closed
//!   at once (`not-redirected`, `loop`, `undeclared`, `plaintext-denied`,
//!   `policy-denied`, `policy-error`).

use prometheus::{IntCounterVec, Opts, Registry};

use super::detect::{Outcome, Protocol};

#[derive(Clone)]
pub struct CaptureMetrics {
    pub connections: IntCounterVec,
    pub refused: IntCounterVec,
}

impl CaptureMetrics {
    /// The counters, registered in `registry` (once per process).
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric");
            // A second registration (a second set of listeners in one
            // process, as in tests) keeps the first one's series.
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        CaptureMetrics {
            connections: counter(
                "crank_capture_connections_total",
                "Captured connections by direction, detected protocol (http1, h2, tls, opaque; unknown when refused before detection) and how detection ended (detected, timeout, skipped, closed, refused)",
                &["direction", "protocol", "outcome"],
            ),
            refused: counter(
                "crank_capture_refused_total",
                "Captured connections closed at once, by direction and reason (not-redirected, loop, undeclared, plaintext-denied, policy-denied, policy-error)",
                &["direction", "reason"],
            ),
        }
    }

    pub fn detected(&self, direction: &str, p: Protocol, o: Outcome) {
        self.connections
            .with_label_values(&[direction, p.as_str(), o.as_str()])
            .inc();
    }

    /// A connection refused before detection (not redirected): counted
    /// in both families, as `protocol="unknown", outcome="refused"`.
    pub fn refused_early(&self, direction: &str, reason: &str) {
        self.connections
            .with_label_values(&[direction, "unknown", "refused"])
            .inc();
        self.refused.with_label_values(&[direction, reason]).inc();
    }

    /// A connection refused after detection (already counted with its
    /// protocol and outcome).
    pub fn refused(&self, direction: &str, reason: &str) {
        self.refused.with_label_values(&[direction, reason]).inc();
    }
}
