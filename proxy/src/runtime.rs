//! The state every phase reads: config, routes, identity, metrics, health.

use std::sync::Arc;

use arc_swap::ArcSwap;
use crank_api::proxy::ProxyConfig;

use crate::health::Health;
use crate::identity::WorkloadTls;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::routing::RouteTable;

pub struct Shared {
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
    pub tracer: Option<crate::spans::Tracer>,
    pub reload: crate::reload::ReloadStatus,
    /// Quotas of each direction; replaced when the config file changes.
    pub quotas: ArcSwap<crate::resilience::flow::QuotaSet>,
    /// The concurrency limit in front of the local app (inbound).
    pub inbound_limiter: Option<crate::resilience::shed::Limiter>,
    /// Responses kept for `Idempotency-Key` replay (inbound).
    pub idempotency: Option<Arc<dyn crate::resilience::idempotency::IdempotencyStore>>,
    /// The identity agent's progress; `None` for a static identity.
    pub enrollment: Option<Arc<crate::enroll::AgentStatus>>,
    /// Config from crank-control and the registration; `None` without `mesh`.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
    /// Live traffic for `GET /tap` on the admin port.
    pub tap: Arc<crate::tap::Tap>,
}

impl Shared {
    /// The effective config as JSON, with the key path left out, plus what
    /// was learned at load time (own identity, certificate validity).
    pub fn config_dump(&self) -> Vec<u8> {
        let cfg = self.config.load();
        let mut v = serde_json::to_value(&**cfg).unwrap_or_default();
        // Export headers often carry an API key: show the names only.
        if let Some(h) = v
            .pointer_mut("/tracing/otlp/headers")
            .and_then(|h| h.as_object_mut())
        {
            for val in h.values_mut() {
                *val = serde_json::Value::String("(secret, not shown)".into());
            }
        }
        if let Some(id) = v.get_mut("identity").and_then(|i| i.as_object_mut()) {
            if id.contains_key("key") {
                id.insert(
                    "key".into(),
                    serde_json::Value::String("(secret, not shown)".into()),
                );
            }
        }
        let t = &self.tls;
        let leaf = t.summary();
        let enrollment = match &self.enrollment {
            Some(a) => a.to_json(),
            None => serde_json::json!({"mode": "static"}),
        };
        let dump = serde_json::json!({
            "config": v,
            "identity": {
                "spiffe_id": t.identity.spiffe_id(),
                "dns_name": t.identity.dns_name(),
                "not_before": leaf.not_before,
                "not_after": leaf.not_after,
                "serial": crank_api::identity::canonical_serial(&leaf.serial),
                "bundle_version": self.metrics.identity.bundle_version.get(),
                "roots": t.roots().iter().map(|r| serde_json::json!({"subject": r.subject, "serial": crank_api::identity::canonical_serial(&r.serial), "not_after": r.not_after})).collect::<Vec<_>>(),
                "deny_list_size": t.deny_list().len(),
                "enrollment": enrollment,
            },
            "routes": self.routes.load().names(),
            "mesh": self.mesh.as_ref().map(|m| m.to_json()),
            "policy": self.policy_dump(),
            "tracing": self.tracer.as_ref().map(|t| serde_json::json!({"sampling": t.ratio()})),
            "last_rejected_config_change": self.reload.last_rejected.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "ready": self.health.is_ready(),
        });
        serde_json::to_vec_pretty(&dump).unwrap_or_default()
    }

    /// Each direction's running policy revision, and the last rejected change.
    fn policy_dump(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for h in self
            .policies
            .inbound
            .iter()
            .chain(self.policies.outbound.iter())
        {
            let set = h.current();
            out.insert(
                h.direction.as_str().into(),
                serde_json::json!({
                    "dir": h.dir.display().to_string(),
                    "revision": set.revision(),
                    "mode": set.manifest().mode.as_str(),
                    "failure_mode": format!("{:?}", set.manifest().failure_mode).to_lowercase(),
                    "input": format!("{:?}", set.manifest().input).to_lowercase(),
                    "entrypoints": {"allow": set.entrypoints().allow, "deny": set.entrypoints().deny},
                    "files": set.files(),
                    "engine": set.engine(),
                    "vm_fallback": set.vm_fallback(),
                    "last_rejected_change": h.last_error(),
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}
