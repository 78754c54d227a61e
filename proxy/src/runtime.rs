//! The runtime every request stage reads: config, routes, identity,
//! metrics, health, policies, tracer, quotas and the other per-process
//! handles. It holds leaf types only (nothing here knows the tasks that
//! write it); the writers (config reload, the mesh watch, the identity
//! agent) live in [`crate::app`] and get the handles they change.

use std::sync::Arc;

use arc_swap::ArcSwap;
use crank_api::proxy::ProxyConfig;

use crate::health::Health;
use crate::identity::WorkloadTls;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::resilience::idempotency::IdempotencyStore;
use crate::resilience::quota::QuotaSet;
use crate::resilience::shed::Limiter;
use crate::routing::RouteTable;
use crate::tap::Tap;

pub struct Runtime {
    pub config: ArcSwap<ProxyConfig>,
    pub routes: ArcSwap<RouteTable>,
    pub tls: Arc<WorkloadTls>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub access_log: bool,
    pub policies: Policies,
    /// This workload's identity as policy input sees it, made once.
    pub me: crank_policy::Workload,
    /// Spans and trace context; `None` when the config has no `tracing`.
    pub tracer: Option<crate::tracing::Tracer>,
    /// Quotas of each direction; replaced when the config changes.
    pub quotas: Arc<ArcSwap<QuotaSet>>,
    /// The concurrency limit in front of the local app (inbound).
    pub inbound_limiter: Option<Limiter>,
    /// Responses kept for `Idempotency-Key` replay (inbound).
    pub idempotency: Option<Arc<dyn IdempotencyStore>>,
    /// Routes come from crank-control (`mesh`), which sends only the
    /// routes whose `clients` name this service.
    pub pushed_routes: bool,
    /// Policy denials and shed requests for the next traffic report to
    /// crank-control; `None` without `mesh`.
    pub refusals: Option<Arc<crate::mesh::report::RefusalRing>>,
    /// Live traffic for `GET /tap` on the admin port.
    pub tap: Arc<Tap>,
}

impl Runtime {
    /// The runtime for a validated config and a loaded identity; the
    /// optional parts (policies, tracer, mesh refusals) are set by the
    /// caller. The app and the tests build it the same way.
    pub fn new(cfg: &ProxyConfig, tls: WorkloadTls, metrics: Metrics, health: Arc<Health>) -> Self {
        Runtime {
            routes: ArcSwap::from_pointee(RouteTable::from_config(cfg)),
            me: crank_policy::Workload::from(&tls.identity),
            tls: Arc::new(tls),
            tap: Arc::new(Tap::new(metrics.tap_dropped.clone())),
            metrics,
            health,
            access_log: cfg.access_log,
            policies: Policies::none(),
            tracer: None,
            quotas: Arc::new(ArcSwap::from_pointee(QuotaSet::from_config(&cfg.quotas))),
            inbound_limiter: cfg
                .inbound
                .as_ref()
                .and_then(|i| i.concurrency.as_ref())
                .map(Limiter::new),
            idempotency: crate::resilience::idempotency::store_for(cfg),
            pushed_routes: cfg.mesh.is_some(),
            refusals: None,
            config: ArcSwap::from_pointee(cfg.clone()),
        }
    }

    /// A runtime for unit tests: `cfg` with a fresh identity
    /// (`web.acme.crank.local`) from a throw-away CA.
    #[cfg(test)]
    pub fn for_tests(cfg: &ProxyConfig) -> Self {
        let m = crate::identity::tests::test_material();
        let metrics = Metrics::new();
        let tls = WorkloadTls::from_material(m, &metrics).unwrap();
        let health = Arc::new(Health::new(metrics.inflight.clone(), metrics.ready.clone()));
        Runtime::new(cfg, tls, metrics, health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_runtime_serves_the_configs_routes_and_its_own_identity() {
        let cfg = crate::config::parse(
            "p.yaml",
            "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\noutbound: {ports: [{listen: 127.0.0.1:2, route: back}]}\nroutes: [{name: back, endpoints: [{address: 127.0.0.1:3, identity: back.acme.crank.local}]}]\n",
        )
        .unwrap();
        let rt = Runtime::for_tests(&cfg);
        assert_eq!(rt.routes.load().names(), vec!["back"]);
        assert_eq!(rt.me.service, "web");
        assert!(!rt.pushed_routes);
        assert!(rt.refusals.is_none());
    }
}
