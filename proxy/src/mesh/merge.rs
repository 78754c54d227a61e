//! How a pushed update becomes the running config: the running config with
//! its `routes` and `quotas.limits` replaced, everything else (identity,
//! listeners, ports, policy sets, tracing) untouched. Pure functions; the
//! caller validates the result like a config file and applies it whole.

use std::collections::BTreeMap;

use crank_api::mesh::MeshUpdate;
use crank_api::proxy::ProxyConfig;

/// The running config with the update's routes and quota limits. Refused
/// when a local port is bound to a route the update does not carry: the
/// port would have nowhere to send.
pub fn merged(running: &ProxyConfig, u: &MeshUpdate) -> Result<ProxyConfig, String> {
    for (i, port) in running.outbound.ports.iter().enumerate() {
        if !u.routes.iter().any(|r| r.name == port.route) {
            return Err(format!(
                "{}: outbound.ports[{i}] ({}) is bound to route {:?}, which this update does not carry (it has {:?}); ports need their route: add this proxy's service to that route's `clients` in crank-control's routes/, or change outbound.ports",
                origin(u),
                port.listen,
                port.route,
                u.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>()
            ));
        }
    }
    let mut new = running.clone();
    new.routes = u.routes.clone();
    new.quotas.limits = u.quotas.clone();
    new.egress = u.egress.clone();
    Ok(new)
}

/// A config read from the file while an update is applied: the update's
/// routes and quota limits stay (the file's are the fallback only).
pub fn overlay(mut file: ProxyConfig, applied: Option<&MeshUpdate>) -> ProxyConfig {
    if let Some(u) = applied {
        file.routes = u.routes.clone();
        file.quotas.limits = u.quotas.clone();
        file.egress = u.egress.clone();
    }
    file
}

/// Pushed policy files are written into one directory: plain names only.
pub fn check_policy_names(policies: &BTreeMap<String, String>) -> Result<(), String> {
    for name in policies.keys() {
        let plain = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(format!(
                "policy file name {name:?} is not a plain file name; rename it in crank-control's policies/ directory"
            ));
        }
    }
    Ok(())
}

/// How an update is named in errors and logs.
pub fn origin(u: &MeshUpdate) -> String {
    let short = u.version.hash.get(..12).unwrap_or(&u.version.hash);
    format!(
        "mesh config seq {} (hash {short}, registry {}) from crank-control",
        u.version.seq, u.registry
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_api::mesh::ConfigVersion;

    fn cfg(extra: &str) -> ProxyConfig {
        let text = format!("identity: {{cert: a.crt, key: a.key, trust_bundle: b.pem}}\nadmin: {{listen: 127.0.0.1:9901}}\ninbound: {{listen: 127.0.0.1:4143, app: 127.0.0.1:8080}}\n{extra}");
        crate::config::parse("p.yaml", &text).unwrap()
    }

    fn update(routes: &str, quotas: &str) -> MeshUpdate {
        let c = cfg(&format!("routes: {routes}\nquotas: {{limits: {quotas}}}\n"));
        MeshUpdate {
            version: ConfigVersion {
                seq: 7,
                hash: "ab".repeat(32),
            },
            registry: 3,
            routes: c.routes,
            quotas: c.quotas.limits,
            policies: BTreeMap::new(),
            egress: Default::default(),
            tenants: None,
        }
    }

    const FILE: &str = "outbound: {ports: [{listen: 127.0.0.1:5001, route: backend}]}\nroutes: [{name: backend, endpoints: [{address: 127.0.0.1:1, identity: backend.demo.crank.local}]}]\nquotas: {tenant_header: x-tenant, limits: [{tenant: a, capability: c, rate: 1/s}]}\n";

    #[test]
    fn routes_and_quota_limits_are_replaced_the_rest_is_kept() {
        let running = cfg(FILE);
        let u = update(
            "[{name: backend, endpoints: [{address: 10.0.0.7:4143, identity: backend.demo.crank.local}]}, {name: other, endpoints: []}]",
            "[{tenant: b, capability: d, rate: 5/s}]",
        );
        let new = merged(&running, &u).unwrap();
        assert_eq!(new.routes, u.routes);
        assert_eq!(new.quotas.limits, u.quotas);
        assert_eq!(new.quotas.tenant_header.as_deref(), Some("x-tenant"));
        assert_eq!(new.identity, running.identity);
        assert_eq!(new.inbound, running.inbound);
        assert_eq!(new.outbound, running.outbound);
        assert_eq!(new.admin, running.admin);
        assert!(crate::app::reload::restart_fields(&running, &new).is_empty());
    }

    #[test]
    fn an_update_without_a_ports_route_is_refused() {
        let running = cfg(FILE);
        let u = update(
            "[{name: other, endpoints: [{address: 10.0.0.7:4143, identity: o.demo.crank.local}]}]",
            "[]",
        );
        let e = merged(&running, &u).unwrap_err();
        assert!(e.contains("outbound.ports[0]"), "{e}");
        assert!(e.contains("\"backend\""), "{e}");
        assert!(e.contains("seq 7"), "{e}");
        assert!(e.contains("clients"), "{e}");
    }

    #[test]
    fn an_empty_quota_list_clears_the_limits() {
        let new = merged(
            &cfg(FILE),
            &update("[{name: backend, endpoints: []}]", "[]"),
        )
        .unwrap();
        assert!(new.quotas.limits.is_empty());
    }

    #[test]
    fn a_file_reload_keeps_the_pushed_routes() {
        let u = update("[{name: backend, endpoints: []}]", "[]");
        let file = cfg(FILE);
        let o = overlay(file.clone(), Some(&u));
        assert_eq!(o.routes, u.routes);
        assert!(o.quotas.limits.is_empty());
        assert_eq!(overlay(file.clone(), None), file);
    }

    #[test]
    fn policy_names_are_plain() {
        let ok: BTreeMap<_, _> = [
            ("authz.rego".to_string(), String::new()),
            ("data.yaml".into(), String::new()),
        ]
        .into();
        check_policy_names(&ok).unwrap();
        for bad in ["", "../x.rego", "a/b.rego", ".hidden", "..", "a\\b"] {
            let m: BTreeMap<_, _> = [(bad.to_string(), String::new())].into();
            assert!(check_policy_names(&m).is_err(), "{bad:?}");
        }
    }
}
