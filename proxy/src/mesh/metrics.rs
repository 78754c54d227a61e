//! The mesh part's metrics, registered in the proxy's registry.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct MeshMetrics {
    /// `crank_mesh_updates_total{result}`: `applied` or `rejected`.
    pub updates: IntCounterVec,
    /// `crank_mesh_config_seq`: the applied config's sequence number.
    pub seq: IntGauge,
    /// `crank_mesh_registry_version` (name kept for dashboards): the
    /// fingerprint of the endpoints the applied routes were resolved with,
    /// `endpoints_fingerprint` in `/config_dump`. Not the registry's own
    /// version (`crankctl endpoints`).
    pub endpoints_fingerprint: IntGauge,
    /// `crank_mesh_registered`: 1 while this workload holds a lease.
    pub registered: IntGauge,
}

impl MeshMetrics {
    pub fn new(registry: &Registry) -> Self {
        let updates = IntCounterVec::new(
            Opts::new(
                "crank_mesh_updates_total",
                "Mesh config updates from crank-control, applied or rejected",
            ),
            &["result"],
        )
        .expect("static metric");
        let seq = IntGauge::new(
            "crank_mesh_config_seq",
            "Sequence number of the applied mesh config (0: none)",
        )
        .expect("static metric");
        let endpoints_fingerprint = IntGauge::new(
            "crank_mesh_registry_version",
            "Fingerprint of the endpoints the applied routes were resolved with (changes when this proxy's endpoints change; not crankctl endpoints' registry version)",
        )
        .expect("static metric");
        let registered = IntGauge::new(
            "crank_mesh_registered",
            "1 while this workload is registered in crank-control's registry",
        )
        .expect("static metric");
        for r in ["applied", "rejected"] {
            updates.with_label_values(&[r]);
        }
        for c in [
            Box::new(updates.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(seq.clone()),
            Box::new(endpoints_fingerprint.clone()),
            Box::new(registered.clone()),
        ] {
            // Registered once per registry; a second Mesh on the same
            // registry (tests) keeps the first's series.
            let _ = registry.register(c);
        }
        MeshMetrics {
            updates,
            seq,
            endpoints_fingerprint,
            registered,
        }
    }
}
