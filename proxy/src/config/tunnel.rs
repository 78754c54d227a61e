//! Checks of the opaque TCP settings: `outbound.tcp`, `inbound.tcp` and
//! `tunnel` (`docs/reference/opaque-tcp.md`).

use std::collections::HashSet;
use std::net::SocketAddr;

use crank_api::proxy::ProxyConfig;

use super::Problems;

pub(super) fn validate_tunnel(cfg: &ProxyConfig, p: &mut Problems) {
    let mut taken: HashSet<SocketAddr> = cfg.outbound.ports.iter().map(|x| x.listen).collect();
    taken.insert(cfg.admin.listen);
    taken.extend(cfg.outbound.http_proxy);
    taken.extend(cfg.inbound.as_ref().map(|i| i.listen));
    for (i, port) in cfg.outbound.tcp.iter().enumerate() {
        if !taken.insert(port.listen) {
            p.push((
                format!("outbound.tcp[{i}].listen"),
                format!(
                    "{} is already used by another listener; give each listener its own port",
                    port.listen
                ),
            ));
        }
        let known = cfg.routes.iter().any(|r| {
            r.capability.as_deref() == Some(&port.capability) || r.name == port.capability
        });
        // Routes pushed by crank-control (`mesh`) arrive later.
        if !known && cfg.mesh.is_none() {
            p.push((
                format!("outbound.tcp[{i}].capability"),
                format!(
                    "no route has capability or name {:?}; add a route for it under `routes`",
                    port.capability
                ),
            ));
        }
    }
    let mut caps = HashSet::new();
    for (i, t) in cfg.inbound.iter().flat_map(|i| i.tcp.iter()).enumerate() {
        if let Some(c) = &t.capability {
            if !caps.insert(c.as_str()) {
                p.push((
                    format!("inbound.tcp[{i}].capability"),
                    format!("{c:?} is served by an earlier inbound.tcp entry; name each capability once"),
                ));
            }
        }
    }
    if cfg.tunnel.max_connections == 0 {
        p.push((
            "tunnel.max_connections".into(),
            "0 would refuse every tunnel; use at least 1 (default 4096)".into(),
        ));
    }
    if cfg.tunnel.idle_timeout.is_zero() {
        p.push((
            "tunnel.idle_timeout".into(),
            "0s would close every tunnel at once; use a duration such as 1h (the default)".into(),
        ));
    }
}

#[cfg(test)]
mod tests {
    fn problems(extra: &str) -> Vec<String> {
        let yaml = format!(
            "identity: {{cert: a, key: b, trust_bundle: c}}\nadmin: {{listen: 127.0.0.1:1}}\nroutes: [{{name: pg, capability: 'db:postgres', endpoints: [{{address: 127.0.0.1:3, identity: db.acme.crank.local}}]}}]\n{extra}"
        );
        let cfg = crate::config::parse("p.yaml", &yaml).unwrap();
        let mut p = Vec::new();
        super::validate_tunnel(&cfg, &mut p);
        p.into_iter().map(|(f, m)| format!("{f}: {m}")).collect()
    }

    #[test]
    fn tunnel_settings_are_checked_with_the_field_and_the_fix() {
        let cases = [
            ("outbound: {tcp: [{listen: 127.0.0.1:5, capability: 'db:postgres'}, {listen: 127.0.0.1:6, capability: pg}]}\n", ""),
            ("outbound: {tcp: [{listen: 127.0.0.1:5, capability: 'db:mysql'}]}\n", "outbound.tcp[0].capability: no route"),
            ("outbound: {tcp: [{listen: 127.0.0.1:1, capability: pg}]}\n", "outbound.tcp[0].listen: 127.0.0.1:1 is already used"),
            ("inbound: {listen: 127.0.0.1:7, app: 127.0.0.1:8, tcp: [{app: 127.0.0.1:9, capability: a}, {app: 127.0.0.1:10, capability: a}]}\n", "inbound.tcp[1].capability"),
            ("tunnel: {max_connections: 0}\n", "tunnel.max_connections: 0 would refuse"),
            ("tunnel: {idle_timeout: 0s}\n", "tunnel.idle_timeout: 0s"),
        ];
        for (extra, want) in cases {
            let got = problems(extra);
            if want.is_empty() {
                assert!(got.is_empty(), "{extra}: {got:?}");
            } else {
                assert!(
                    got.len() == 1 && got[0].starts_with(want),
                    "{extra}: {got:?}"
                );
            }
        }
    }
}
