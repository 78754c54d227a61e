//! Egress metrics (`docs/reference/metrics.md`, "Egress").

use prometheus::{IntCounterVec, Opts, Registry};

/// Requests to destinations outside the mesh.
#[derive(Clone)]
pub struct EgressMetrics {
    /// `crank_egress_requests_total{route, destination, status_class}`:
    /// requests an egress route (or a pass-through) sent outside the mesh;
    /// `destination` is the declared name, or `undeclared`.
    pub requests: IntCounterVec,
    /// `crank_egress_undeclared_total{mode}`: requests for a destination
    /// nothing declares, by `egress.mode` (`allow`, `audit`, `deny`).
    pub undeclared: IntCounterVec,
}

impl EgressMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "crank_egress_requests_total",
                "Requests sent outside the mesh, by route, egress destination (declared name, or undeclared) and status class",
            ),
            &["route", "destination", "status_class"],
        )
        .expect("static metric");
        let undeclared = IntCounterVec::new(
            Opts::new(
                "crank_egress_undeclared_total",
                "Requests for a destination outside the mesh that nothing declares, by egress mode",
            ),
            &["mode"],
        )
        .expect("static metric");
        for c in [&requests, &undeclared] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
        }
        EgressMetrics {
            requests,
            undeclared,
        }
    }
}
