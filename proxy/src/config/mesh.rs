//! Config checks of the `mesh` section: crank-control's watch, traffic
//! reports, the pushed-policy directory and the registration.

use std::path::Path;
use std::time::Duration;

use crank_api::proxy::ProxyConfig;

use super::{resolve, Problems};

/// The `mesh` section: needs the enrolled identity; waits and leases in
/// range; pushed policies land where the inbound policy set is read; a
/// registration has an inbound listener and an address peers can dial.
pub(super) fn validate_mesh(
    cfg: &ProxyConfig,
    m: &crank_api::proxy::MeshConfig,
    base: &Path,
    p: &mut Problems,
) {
    if cfg.identity.enroll.is_none() {
        p.push(("mesh".into(), "needs identity.enroll: crank-control knows this proxy by its enrolled identity and serves it over mTLS; add identity.enroll, or remove mesh and keep routes in this file".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&m.watch_wait) {
        p.push((
            "mesh.watch_wait".into(),
            "is out of range; use 1s to 60s (default 30s)".into(),
        ));
    }
    let every = m.report_interval;
    if !every.is_zero() && !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&every) {
        p.push((
            "mesh.report_interval".into(),
            "is out of range; use 1s to 10m (default 10s), or 0s to send no traffic reports".into(),
        ));
    }
    if m.state_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        p.push(("mesh.state_dir".into(), "is empty; give a directory the proxy may write, or leave it out for identity.enroll.state_dir".into()));
    }
    if let Some(pd) = &m.policy_dir {
        validate_policy_dir(cfg, pd, base, p);
    }
    if let Some(r) = &m.register {
        validate_register(cfg, r, p);
    }
}

/// `mesh.policy_dir`: where pushed policies are written, which must be
/// where the inbound policy set is read.
fn validate_policy_dir(cfg: &ProxyConfig, pd: &Path, base: &Path, p: &mut Problems) {
    if pd.as_os_str().is_empty() {
        p.push(("mesh.policy_dir".into(), "is empty; give the directory of policy.inbound.dir, or leave it out to ignore pushed policies".into()));
    }
    if let Some(inb) = cfg.policy.as_ref().and_then(|p| p.inbound.as_ref()) {
        let (a, b) = (resolve(base, pd), resolve(base, &inb.dir));
        let same =
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
        if !same {
            p.push((
                "mesh.policy_dir".into(),
                format!(
                    "{} is not policy.inbound.dir ({}); pushed policies must be written where the inbound policy set is read: make them the same directory",
                    a.display(),
                    b.display()
                ),
            ));
        }
    }
}

/// `mesh.register`: an address peers can dial, a lease in range, the
/// capabilities served.
fn validate_register(
    cfg: &ProxyConfig,
    r: &crank_api::proxy::MeshRegisterConfig,
    p: &mut Problems,
) {
    let Some(inb) = &cfg.inbound else {
        p.push(("mesh.register".into(), "this proxy has no inbound listener for peers to reach; add `inbound`, or remove mesh.register (a client-only workload is not registered)".into()));
        return;
    };
    let addr = r.address.unwrap_or(inb.listen);
    let field = if r.address.is_some() {
        "mesh.register.address"
    } else {
        "mesh.register"
    };
    if addr.ip().is_unspecified() || addr.port() == 0 {
        p.push((
            field.into(),
            format!("{addr} is not an address peers can dial; set mesh.register.address to this sidecar's reachable address, e.g. 10.0.0.7:{}", inb.listen.port()),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&r.lease) {
        p.push((
            "mesh.register.lease".into(),
            "is out of range; use 1s to 5m (default 10s)".into(),
        ));
    }
    if r.capabilities.is_empty() && r.from_file.is_none() {
        p.push(("mesh.register.capabilities".into(), "is empty; list the capabilities this workload serves (hello:v1), or set from_file to crank-shim's registration_file".into()));
    }
    if let Some(c) = r.capabilities.iter().find(|c| c.trim().is_empty()) {
        p.push((
            "mesh.register.capabilities".into(),
            format!("{c:?} is empty; name each capability, e.g. hello:v1"),
        ));
    }
    if r.labels.keys().any(|k| k.is_empty()) {
        p.push((
            "mesh.register.labels".into(),
            "has an empty label name".into(),
        ));
    }
    if r.from_file
        .as_ref()
        .is_some_and(|f| f.as_os_str().is_empty())
    {
        p.push((
            "mesh.register.from_file".into(),
            "is empty; give crank-shim's registration_file, or leave it out".into(),
        ));
    }
}
