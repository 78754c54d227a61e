//! The `egress` section's checks and its CA files: each problem names the
//! field and the fix; a `tls.ca` file (relative to the config file) is read
//! once at load and kept as PEM text, as crank-control pushes it.

use std::path::Path;

use crank_api::proxy::ProxyConfig;

/// Every problem of the `egress` section and of the routes that name it,
/// as `(field, message)`.
pub fn problems(cfg: &ProxyConfig, base: &Path) -> Vec<(String, String)> {
    let mut p = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, d) in cfg.egress.destinations.iter().enumerate() {
        let at = |f: &str| format!("egress.destinations[{i}].{f}");
        for (field, msg) in d.problems() {
            p.push((at(field), msg));
        }
        if !names.insert(d.name.as_str()) {
            p.push((
                at("name"),
                format!(
                    "destination {:?} is declared twice; give each destination its own name",
                    d.name
                ),
            ));
        }
        if let Some(tls) = &d.tls {
            if let Err(e) = ca_pem(&tls.ca, base) {
                p.push((at("tls.ca"), e));
            }
        }
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let Some(name) = &r.egress else { continue };
        if !cfg.egress.destinations.iter().any(|d| &d.name == name) {
            p.push((format!("routes[{i}].egress"), format!("destination {name:?} is not in egress.destinations; declare it there or fix the name")));
        }
        if !r.endpoints.is_empty() {
            p.push((format!("routes[{i}].endpoints"), format!("route {:?} sends to egress destination {name:?}, so it has no endpoints; remove them or remove `egress`", r.name)));
        }
    }
    p
}

/// Replaces every `tls.ca` file name with the file's PEM text (after
/// [`problems`] found none).
pub fn inline_cas(cfg: &mut ProxyConfig, base: &Path) {
    for d in &mut cfg.egress.destinations {
        if let Some(tls) = &mut d.tls {
            if let Ok(pem) = ca_pem(&tls.ca, base) {
                tls.ca = pem;
            }
        }
    }
}

/// The PEM text of `ca` (inline, or a file), checked to hold certificates.
fn ca_pem(ca: &str, base: &Path) -> Result<String, String> {
    let pem = if ca.contains("-----BEGIN") {
        ca.to_string()
    } else {
        let path = super::resolve(base, Path::new(ca));
        std::fs::read_to_string(&path).map_err(|e| {
            format!("cannot read {}: {e}; give the PEM file of the CA that signed the destination's certificate", path.display())
        })?
    };
    crank_certs::pem::certs_from_pem(pem.as_bytes())
        .map_err(|e| format!("{e}; give the CA certificate (PEM) that signed the destination's"))?;
    Ok(pem)
}
