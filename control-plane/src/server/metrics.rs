//! crank-control's Prometheus metrics (`/metrics` on the admin socket and
//! on `metrics_listen`).

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::state::{CaState, Phase, Report};
use super::tls::ServerTls;

pub struct Metrics {
    pub registry: Registry,
    pub issued: IntCounterVec,
    pub refused: IntCounterVec,
    expiry: IntGaugeVec,
    phase: IntGaugeVec,
    workloads: IntGaugeVec,
    bundle_version: IntGaugeVec,
    mesh: IntGaugeVec,
}

/// A counter registered in `registry` (names are fixed and unique: a
/// failure here is a bug caught by the tests).
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

/// A gauge registered in `registry`.
fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            issued: counter(
                r,
                "crank_ca_certs_issued_total",
                "Leaf certificates issued, by kind (enroll, renew)",
                &["kind"],
            ),
            refused: counter(
                r,
                "crank_ca_requests_refused_total",
                "Requests refused by the workload API (enroll, renew, watch) and the admin API, by reason code",
                &["reason"],
            ),
            expiry: gauge(
                r,
                "crank_cert_expiry_timestamp_seconds",
                "Not-after of each CA certificate (root, intermediate) and of the control plane's own TLS certificate (control), unix seconds",
                &["cert", "subject", "serial"],
            ),
            phase: gauge(
                r,
                "crank_ca_rotation_phase",
                "1 for the current rotation phase (idle, adding-root, reissuing, removing-root)",
                &["phase"],
            ),
            workloads: gauge(
                r,
                "crank_ca_workloads",
                "Workloads known to the CA: active (counted in rotations), stale (not seen within workloads.stale_after), lagging (holding back the current rotation phase)",
                &["state"],
            ),
            bundle_version: gauge(
                r,
                "crank_ca_versions",
                "Current trust bundle and deny list versions",
                &["what"],
            ),
            mesh: gauge(
                r,
                "crank_mesh_config",
                "The published mesh config: seq (version number), published_at and rejected_at (unix seconds of the last refused change, 0 when the directory is valid)",
                &["what"],
            ),
            registry,
        }
    }

    pub fn observe_mesh(&self, m: &super::mesh::MeshState) {
        let seq = m.current.as_ref().map_or(0, |c| c.seq as i64);
        self.mesh.with_label_values(&["seq"]).set(seq);
        self.mesh
            .with_label_values(&["published_at"])
            .set(m.current.as_ref().map_or(0, |c| c.published_at));
        self.mesh
            .with_label_values(&["rejected_at"])
            .set(m.last_error.as_ref().map_or(0, |e| e.0));
    }

    pub fn observe(&self, st: &CaState, tls: &ServerTls) {
        self.expiry.reset();
        for r in &st.roots {
            self.expiry
                .with_label_values(&["root", &r.subject, &r.serial])
                .set(r.not_after);
        }
        for i in st.intermediates.iter().filter(|i| i.key_pem.is_some()) {
            self.expiry
                .with_label_values(&["intermediate", &i.subject, &i.serial])
                .set(i.not_after);
        }
        let (serial, not_after) = tls.own_cert();
        self.expiry
            .with_label_values(&["control", "control.crank-system", &serial])
            .set(not_after);
        for p in [
            Phase::Idle,
            Phase::AddingRoot,
            Phase::Reissuing,
            Phase::RemovingRoot,
        ] {
            self.phase
                .with_label_values(&[p.as_str()])
                .set((st.rotation.phase == p) as i64);
        }
        self.bundle_version
            .with_label_values(&["bundle"])
            .set(st.bundle_version as i64);
        self.bundle_version
            .with_label_values(&["revocations"])
            .set(st.revocations_version as i64);
    }

    pub fn observe_workloads(
        &self,
        st: &CaState,
        reports: &HashMap<String, Report>,
        stale: Duration,
    ) {
        let now = super::now();
        let active = reports
            .values()
            .filter(|r| st.is_active(r, stale, now))
            .count();
        let quiet = reports
            .values()
            .filter(|r| now - r.last_seen > stale.as_secs() as i64)
            .count();
        self.workloads
            .with_label_values(&["active"])
            .set(active as i64);
        self.workloads
            .with_label_values(&["stale"])
            .set(quiet as i64);
        self.workloads
            .with_label_values(&["lagging"])
            .set(st.lagging(reports, stale, now).len() as i64);
    }

    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
