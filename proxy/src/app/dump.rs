//! `/config_dump`: the effective config (secrets left out) with what was
//! learned at load time and since: own identity and certificate, routes,
//! the mesh part, policies, tracing, the last refused change, readiness.

use super::admin::AdminState;

/// The effective config as JSON, with the key path left out, plus what
/// was learned at load time (own identity, certificate validity).
pub fn config_dump(state: &AdminState) -> Vec<u8> {
    let rt = &state.rt;
    let cfg = rt.config.load();
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
    let t = &rt.tls;
    let leaf = t.summary();
    let enrollment = match &state.enrollment {
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
            "bundle_version": rt.metrics.identity.bundle_version.get(),
            "roots": t.roots().iter().map(|r| serde_json::json!({"subject": r.subject, "serial": crank_api::identity::canonical_serial(&r.serial), "not_after": r.not_after})).collect::<Vec<_>>(),
            "deny_list_size": t.deny_list().len(),
            "enrollment": enrollment,
        },
        "routes": rt.routes.load().names(),
        "mesh": state.mesh.as_ref().map(|m| m.to_json()),
        "policy": policy_dump(&rt.policies),
        "tracing": rt.tracer.as_ref().map(|t| serde_json::json!({"sampling": t.ratio()})),
        "last_rejected_config_change": state.reloader.last_rejected(),
        "ready": rt.health.is_ready(),
    });
    serde_json::to_vec_pretty(&dump).unwrap_or_default()
}

/// Each direction's running policy revision, and the last rejected change.
fn policy_dump(policies: &crate::policy::Policies) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for h in policies.inbound.iter().chain(policies.outbound.iter()) {
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
