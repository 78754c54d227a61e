//! Loading and validating `crank-proxy --config FILE.yaml`.
//!
//! The document is typed ([`crank_api::proxy::ProxyConfig`]), unknown keys are
//! rejected, and every error names the file, the field and the fix. A config
//! that fails validation is rejected whole.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_api::proxy::ProxyConfig;
use crank_certs::Identity;

/// A config error: which file, which field, what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

/// Reads, parses and validates a proxy config file.
pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: "(file)".into(),
        message: format!("cannot read the config file: {e}; check the --config path"),
    })?;
    let cfg = parse(&file, &text)?;
    validate(&file, &cfg, path.parent().unwrap_or(Path::new(".")))?;
    Ok(cfg)
}

/// Parses YAML text; errors carry the field path and the line.
pub fn parse(file: &str, text: &str) -> Result<ProxyConfig, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let mut message = inner.to_string();
        if message.contains("unknown field") {
            message
                .push_str("; remove it or fix its spelling (see docs/reference/proxy-config.md)");
        } else if message.contains("missing field") {
            message.push_str("; add it (see docs/reference/proxy-config.md)");
        }
        ConfigError {
            file: file.to_string(),
            field: if field == "." || field.is_empty() {
                "(top level)".into()
            } else {
                field
            },
            message,
        }
    })
}

/// Checks what types cannot: references between sections, unique names and
/// addresses, identities, readable files. Relative paths resolve against `base`.
pub fn validate(file: &str, cfg: &ProxyConfig, base: &Path) -> Result<(), ConfigError> {
    validate_with(file, cfg, base, false)
}

/// The same checks for a config whose routes came from crank-control
/// (`mesh`): a route may have no endpoints yet (none registered; its
/// requests get 503 until one is).
pub fn validate_pushed(file: &str, cfg: &ProxyConfig, base: &Path) -> Result<(), ConfigError> {
    validate_with(file, cfg, base, true)
}

fn validate_with(
    file: &str,
    cfg: &ProxyConfig,
    base: &Path,
    pushed: bool,
) -> Result<(), ConfigError> {
    let err = |field: String, message: String| ConfigError {
        file: file.to_string(),
        field,
        message,
    };
    validate_identity(&cfg.identity, base).map_err(|(f, m)| err(f, m))?;
    if cfg.threads == 0 || cfg.threads > 64 {
        return Err(err(
            "threads".into(),
            format!("{} is out of range; use 1 to 64", cfg.threads),
        ));
    }
    let mut names = HashSet::new();
    let mut hosts: HashMap<String, &str> = HashMap::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        if r.name.is_empty() {
            return Err(err(
                format!("routes[{i}].name"),
                "is empty; name the route after its capability or service".into(),
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(err(
                format!("routes[{i}].name"),
                format!(
                    "route {:?} is defined twice; give each route a unique name",
                    r.name
                ),
            ));
        }
        if r.endpoints.is_empty() && !pushed {
            return Err(err(format!("routes[{i}].endpoints"), format!("route {:?} has no endpoints; add at least one peer sidecar address and identity", r.name)));
        }
        for h in std::iter::once(&r.name).chain(r.hosts.iter()) {
            let h = h.to_ascii_lowercase();
            if let Some(other) = hosts.insert(h.clone(), &r.name) {
                if other != r.name {
                    return Err(err(format!("routes[{i}].hosts"), format!("host {h:?} already selects route {other:?}; a host may select one route only")));
                }
            }
        }
        for (j, ep) in r.endpoints.iter().enumerate() {
            if let Err(e) = ep.identity.parse::<Identity>() {
                return Err(err(
                    format!("routes[{i}].endpoints[{j}].identity"),
                    e.to_string(),
                ));
            }
            if !(1..=1_000_000).contains(&ep.weight) {
                return Err(err(
                    format!("routes[{i}].endpoints[{j}].weight"),
                    format!("weight {} is not 1 to 1000000; the weight is the endpoint's share of the route's traffic relative to the other endpoints (default 1), to take an endpoint out remove it from the list", ep.weight),
                ));
            }
        }
    }
    let mut listens: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |addr: SocketAddr, field: String| -> Result<(), ConfigError> {
        if let Some(prev) = listens.insert(addr, field.clone()) {
            return Err(err(
                field,
                format!("{addr} is already used by {prev}; give each listener its own port"),
            ));
        }
        Ok(())
    };
    claim(cfg.admin.listen, "admin.listen".into())?;
    if let Some(inb) = &cfg.inbound {
        claim(inb.listen, "inbound.listen".into())?;
    }
    if let Some(p) = cfg.outbound.http_proxy {
        claim(p, "outbound.http_proxy".into())?;
    }
    for (i, port) in cfg.outbound.ports.iter().enumerate() {
        claim(port.listen, format!("outbound.ports[{i}].listen"))?;
        if !names.contains(port.route.as_str()) {
            let known: Vec<_> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(err(
                format!("outbound.ports[{i}].route"),
                format!(
                    "route {:?} is not defined; define it under `routes` or use one of {known:?}",
                    port.route
                ),
            ));
        }
    }
    if let Some(p) = &cfg.policy {
        if p.inbound.is_none() && p.outbound.is_none() {
            return Err(err(
                "policy".into(),
                "names no policy set; add policy.inbound.dir or policy.outbound.dir, or remove policy".into(),
            ));
        }
        if p.inbound.is_some() && cfg.inbound.is_none() {
            return Err(err(
                "policy.inbound".into(),
                "this proxy has no inbound listener to check; add `inbound` or move the set to policy.outbound".into(),
            ));
        }
        if p.outbound.is_some()
            && cfg.outbound.http_proxy.is_none()
            && cfg.outbound.ports.is_empty()
        {
            return Err(err(
                "policy.outbound".into(),
                "this proxy has no outbound listener to check; add outbound.http_proxy or outbound.ports, or remove it".into(),
            ));
        }
        for (field, src) in [
            ("policy.inbound.dir", &p.inbound),
            ("policy.outbound.dir", &p.outbound),
        ] {
            if let Some(src) = src {
                let d = resolve(base, &src.dir);
                if !d.is_dir() {
                    return Err(err(
                        field.into(),
                        format!(
                            "{} is not a directory; point it at a directory of .rego files",
                            d.display()
                        ),
                    ));
                }
            }
        }
        if p.decision_log.max_bytes < 4096 {
            return Err(err(
                "policy.decision_log.max_bytes".into(),
                format!(
                    "{} is too small; use at least 4096",
                    p.decision_log.max_bytes
                ),
            ));
        }
    }
    if let Some(t) = &cfg.tracing {
        validate_tracing(t).map_err(|(field, message)| err(field, message))?;
    }
    validate_resilience(cfg).map_err(|(field, message)| err(field, message))?;
    if let Some(m) = &cfg.mesh {
        validate_mesh(cfg, m, base).map_err(|(field, message)| err(field, message))?;
    }
    Ok(())
}

/// The `mesh` section: needs the enrolled identity; waits and leases in
/// range; pushed policies land where the inbound policy set is read; a
/// registration has an inbound listener and an address peers can dial.
fn validate_mesh(
    cfg: &ProxyConfig,
    m: &crank_api::proxy::MeshConfig,
    base: &Path,
) -> Result<(), (String, String)> {
    if cfg.identity.enroll.is_none() {
        return Err(("mesh".into(), "needs identity.enroll: crank-control knows this proxy by its enrolled identity and serves it over mTLS; add identity.enroll, or remove mesh and keep routes in this file".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&m.watch_wait) {
        return Err((
            "mesh.watch_wait".into(),
            "is out of range; use 1s to 60s (default 30s)".into(),
        ));
    }
    if m.state_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err(("mesh.state_dir".into(), "is empty; give a directory the proxy may write, or leave it out for identity.enroll.state_dir".into()));
    }
    if let Some(pd) = &m.policy_dir {
        if pd.as_os_str().is_empty() {
            return Err(("mesh.policy_dir".into(), "is empty; give the directory of policy.inbound.dir, or leave it out to ignore pushed policies".into()));
        }
        if let Some(inb) = cfg.policy.as_ref().and_then(|p| p.inbound.as_ref()) {
            let (a, b) = (resolve(base, pd), resolve(base, &inb.dir));
            let same =
                a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
            if !same {
                return Err((
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
    let Some(r) = &m.register else {
        return Ok(());
    };
    let Some(inb) = &cfg.inbound else {
        return Err(("mesh.register".into(), "this proxy has no inbound listener for peers to reach; add `inbound`, or remove mesh.register (a client-only workload is not registered)".into()));
    };
    let addr = r.address.unwrap_or(inb.listen);
    let field = if r.address.is_some() {
        "mesh.register.address"
    } else {
        "mesh.register"
    };
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err((
            field.into(),
            format!("{addr} is not an address peers can dial; set mesh.register.address to this sidecar's reachable address, e.g. 10.0.0.7:{}", inb.listen.port()),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&r.lease) {
        return Err((
            "mesh.register.lease".into(),
            "is out of range; use 1s to 5m (default 10s)".into(),
        ));
    }
    if r.capabilities.is_empty() && r.from_file.is_none() {
        return Err(("mesh.register.capabilities".into(), "is empty; list the capabilities this workload serves (hello:v1), or set from_file to crank-shim's registration_file".into()));
    }
    if let Some(c) = r.capabilities.iter().find(|c| c.trim().is_empty()) {
        return Err((
            "mesh.register.capabilities".into(),
            format!("{c:?} is empty; name each capability, e.g. hello:v1"),
        ));
    }
    if r.labels.keys().any(|k| k.is_empty()) {
        return Err((
            "mesh.register.labels".into(),
            "has an empty label name".into(),
        ));
    }
    if r.from_file
        .as_ref()
        .is_some_and(|f| f.as_os_str().is_empty())
    {
        return Err((
            "mesh.register.from_file".into(),
            "is empty; give crank-shim's registration_file, or leave it out".into(),
        ));
    }
    Ok(())
}

/// Quotas, concurrency limits, retries, circuits, faults, idempotency:
/// numbers in range, rates that parse.
fn validate_resilience(cfg: &ProxyConfig) -> Result<(), (String, String)> {
    use crank_api::proxy::ConcurrencyConfig;
    let q = &cfg.quotas;
    for (i, l) in q.limits.iter().enumerate() {
        let f = format!("quotas.limits[{i}]");
        crate::resilience::parse_rate(&l.rate).map_err(|m| (format!("{f}.rate"), m))?;
        if l.burst == Some(0) {
            return Err((format!("{f}.burst"), "is 0, which lets nothing pass; use at least 1, or leave it out to equal the rate's count".into()));
        }
        if l.tenant.is_empty() || l.capability.is_empty() {
            return Err((
                f,
                "tenant and capability must be set; use \"*\" to match any".into(),
            ));
        }
    }
    if let Some(h) = &q.tenant_header {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err((
                "quotas.tenant_header".into(),
                format!("{h:?} is not a valid header name; use a token such as x-tenant"),
            ));
        }
    }
    if q.max_keys == 0 {
        return Err((
            "quotas.max_keys".into(),
            "is 0; use at least 1 (default 100000)".into(),
        ));
    }
    let conc = |f: String, c: &ConcurrencyConfig| -> Result<(), (String, String)> {
        if c.max_concurrent == 0 {
            return Err((
                format!("{f}.max_concurrent"),
                "is 0, which refuses every request; use at least 1, or remove the section".into(),
            ));
        }
        if c.queue_timeout.is_zero() && c.max_queue > 0 {
            return Err((format!("{f}.queue_timeout"), "is zero while max_queue lets requests wait; give a wait such as 1s, or set max_queue to 0".into()));
        }
        Ok(())
    };
    if let Some(inb) = &cfg.inbound {
        if let Some(c) = &inb.concurrency {
            conc("inbound.concurrency".into(), c)?;
        }
        let id = &inb.idempotency;
        if id.enabled && id.max_response_bytes > id.max_total_bytes {
            return Err(("inbound.idempotency.max_response_bytes".into(), "is larger than max_total_bytes, so such a response could never be kept; lower it or raise max_total_bytes".into()));
        }
        if id.enabled && (id.ttl.is_zero() || id.max_entries == 0 || id.max_total_bytes == 0) {
            return Err(("inbound.idempotency".into(), "ttl, max_entries and max_total_bytes must be above zero; set enabled: false to turn replay off".into()));
        }
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let f = format!("routes[{i}]");
        if let Some(c) = &r.concurrency {
            conc(format!("{f}.concurrency"), c)?;
        }
        if r.timeout.is_some_and(|t| t.is_zero()) {
            return Err((
                format!("{f}.timeout"),
                "is zero; give a deadline such as 10s, or leave it out".into(),
            ));
        }
        let rt = &r.retry;
        if rt.attempts > 10 {
            return Err((
                format!("{f}.retry.attempts"),
                format!("{} is too many; use 0 to 10", rt.attempts),
            ));
        }
        if !(0.0..=10.0).contains(&rt.budget_ratio) {
            return Err((
                format!("{f}.retry.budget_ratio"),
                format!(
                    "{} is out of range; use a share such as 0.2 (0.0 to 10.0)",
                    rt.budget_ratio
                ),
            ));
        }
        if rt.backoff_base > rt.backoff_max {
            return Err((
                format!("{f}.retry.backoff_base"),
                "is longer than backoff_max; make backoff_max at least backoff_base".into(),
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&rt.budget_window) {
            return Err((
                format!("{f}.retry.budget_window"),
                "is out of range; use 1s to 60s".into(),
            ));
        }
        let c = &r.circuit;
        if c.max_ejected_percent > 100 {
            return Err((
                format!("{f}.circuit.max_ejected_percent"),
                format!("{} is over 100", c.max_ejected_percent),
            ));
        }
        if c.consecutive_failures > 0
            && (c.base_ejection.is_zero() || c.base_ejection > c.max_ejection)
        {
            return Err((
                format!("{f}.circuit.base_ejection"),
                "must be above zero and at most max_ejection".into(),
            ));
        }
        if let Some(fault) = &r.fault {
            if let Some(d) = &fault.delay {
                if !(0.0..=100.0).contains(&d.percent) {
                    return Err((
                        format!("{f}.fault.delay.percent"),
                        format!("{} is out of range; use 0 to 100", d.percent),
                    ));
                }
            }
            if let Some(a) = &fault.abort {
                if !(0.0..=100.0).contains(&a.percent) {
                    return Err((
                        format!("{f}.fault.abort.percent"),
                        format!("{} is out of range; use 0 to 100", a.percent),
                    ));
                }
                if !(400..=599).contains(&a.status) {
                    return Err((
                        format!("{f}.fault.abort.status"),
                        format!("{} is not an error status; use 400 to 599", a.status),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The identity section: exactly one of a static certificate (`cert` and
/// `key`) or `enroll`, readable files, enrollment settings in range.
fn validate_identity(
    id: &crank_api::proxy::IdentityConfig,
    base: &Path,
) -> Result<(), (String, String)> {
    let readable = |field: &str, path: &Path, fix: &str| -> Result<(), (String, String)> {
        let p = resolve(base, path);
        std::fs::metadata(&p).map(|_| ()).map_err(|e| {
            (
                field.to_string(),
                format!("cannot read {}: {e}; {fix}", p.display()),
            )
        })
    };
    let issue = "make it with `crankctl cert issue` or fix the path";
    match (&id.cert, &id.key, &id.enroll) {
        (Some(_), Some(_), Some(_)) | (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
            Err(("identity.enroll".into(), "is set together with identity.cert/identity.key; use cert and key for a static certificate, or enroll to get one from crank-control, not both".into()))
        }
        (None, None, None) => Err(("identity".into(), "has neither cert and key nor enroll; set identity.cert and identity.key (from `crankctl cert issue`), or identity.enroll to get a certificate from crank-control".into())),
        (Some(_), None, None) => Err(("identity.key".into(), "is missing while identity.cert is set; add the key issued with that certificate".into())),
        (None, Some(_), None) => Err(("identity.cert".into(), "is missing while identity.key is set; add the certificate issued with that key".into())),
        (Some(cert), Some(key), None) => {
            readable("identity.cert", cert, issue)?;
            readable("identity.key", key, issue)?;
            readable("identity.trust_bundle", &id.trust_bundle, issue)
        }
        (None, None, Some(e)) => {
            readable("identity.trust_bundle", &id.trust_bundle, "with identity.enroll it is the bootstrap bundle that verifies crank-control; copy the CA's bundle.pem (from `crankctl ca init`) there")?;
            validate_enroll(e)
        }
    }
}

fn validate_enroll(e: &crank_api::proxy::EnrollConfig) -> Result<(), (String, String)> {
    let f = |name: &str| format!("identity.enroll.{name}");
    let port_ok = e
        .control_plane
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err((
            f("control_plane"),
            format!(
                "{:?} is not host:port; give crank-control's workload API address, e.g. 127.0.0.1:8443",
                e.control_plane
            ),
        ));
    }
    if let Err(err) = Identity::new(&e.service, &e.tenant, &e.trust_domain) {
        return Err((
            f("service"),
            format!("service, tenant and trust_domain do not make an identity: {err}"),
        ));
    }
    if let Some(n) = &e.server_name {
        if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
            return Err((
                f("server_name"),
                format!(
                    "{n:?} is not a DNS name; leave it out for control.crank-system.<trust_domain>"
                ),
            ));
        }
    }
    if !(0.1..=0.9).contains(&e.renew_at) {
        return Err((
            f("renew_at"),
            format!(
                "{} is out of range; use a fraction of the certificate's lifetime from 0.1 to 0.9 (default 0.66)",
                e.renew_at
            ),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&e.watch_wait) {
        return Err((
            f("watch_wait"),
            "is out of range; use 1s to 60s (default 30s)".into(),
        ));
    }
    if e.state_dir.as_os_str().is_empty() {
        return Err((
            f("state_dir"),
            "is empty; give a directory the proxy may write, e.g. /var/lib/crank/<service>".into(),
        ));
    }
    Ok(())
}

/// The tracing section: numbers in range, an endpoint that is an http(s)
/// URL, headers that can be sent.
fn validate_tracing(t: &crank_api::proxy::TracingConfig) -> Result<(), (String, String)> {
    if !(0.0..=1.0).contains(&t.sampling) {
        return Err((
            "tracing.sampling".into(),
            format!(
                "{} is out of range; use a share from 0.0 (no new traces) to 1.0 (all)",
                t.sampling
            ),
        ));
    }
    if !(1..=1 << 20).contains(&t.max_queue_size) {
        return Err((
            "tracing.max_queue_size".into(),
            format!(
                "{} is out of range; use 1 to 1048576 spans",
                t.max_queue_size
            ),
        ));
    }
    if t.max_export_batch_size == 0 || t.max_export_batch_size > t.max_queue_size {
        return Err((
            "tracing.max_export_batch_size".into(),
            format!(
                "{} is out of range; use 1 to max_queue_size ({})",
                t.max_export_batch_size, t.max_queue_size
            ),
        ));
    }
    if t.scheduled_delay.is_zero() {
        return Err((
            "tracing.scheduled_delay".into(),
            "is zero; use a duration such as 1s".into(),
        ));
    }
    if let Some(ep) = &t.otlp.endpoint {
        let ok = ep
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("http"))
            .filter(|u| u.authority().is_some());
        if ok.is_none() {
            return Err((
                "tracing.otlp.endpoint".into(),
                format!(
                    "{ep:?} is not a plain http:// URL; use the collector's OTLP/HTTP traces URL (http://jaeger:4318/v1/traces) or gRPC address (http://jaeger:4317). For TLS to a remote collector, run an OpenTelemetry Collector on loopback"
                ),
            ));
        }
    }
    for k in t.resource.keys() {
        if k == "service.name" || k.starts_with("crank.") {
            return Err((
                format!("tracing.resource.{k}"),
                "is set by the proxy; use tracing.service_name for the service name, and leave crank.* attributes to the proxy".into(),
            ));
        }
    }
    for (k, v) in &t.otlp.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            return Err((
                format!("tracing.otlp.headers.{k}"),
                "is not a valid HTTP header name and value; use a token name and a printable ASCII value".into(),
            ));
        }
    }
    Ok(())
}

/// Resolves a config path relative to the config file's directory.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_certs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["a.crt", "a.key", "bundle.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        d
    }

    const BASE: &str = "identity: {cert: a.crt, key: a.key, trust_bundle: bundle.pem}\nadmin: {listen: 127.0.0.1:9901}\n";

    fn check(extra: &str) -> Result<ProxyConfig, ConfigError> {
        let d = dir_with_certs();
        let text = format!("{BASE}{extra}");
        let cfg = parse("p.yaml", &text)?;
        validate("p.yaml", &cfg, d.path())?;
        Ok(cfg)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = check("").unwrap();
        assert_eq!(cfg.threads, 1);
        assert_eq!(cfg.drain.deadline.as_secs(), 30);
        assert!(cfg.inbound.is_none());
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let cases: &[(&str, &str, &str)] = &[
            ("bogus: 1\n", "bogus", "unknown field `bogus`"),
            // found by fuzz/proxy_config: a YAML complex key with an empty name
            ("?\n", "(top level)", "unknown field"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2, colour: red}\n", "inbound.colour", "unknown field `colour`"),
            ("inbound: {listen: nope, app: 127.0.0.1:2}\n", "inbound.listen", "invalid socket address"),
            ("outbound: {ports: [{listen: 127.0.0.1:5, route: b}]}\n", "outbound.ports[0].route", "define it under `routes`"),
            ("routes: [{name: b, endpoints: []}]\n", "routes[0].endpoints", "has no endpoints"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: nope}]}]\n", "routes[0].endpoints[0].identity", "<service>.<tenant>.<trust-domain>"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}]}, {name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}]}]\n", "routes[1].name", "defined twice"),
            ("inbound: {listen: 127.0.0.1:9901, app: 127.0.0.1:2}\n", "inbound.listen", "already used by admin.listen"),
            ("threads: 0\n", "threads", "use 1 to 64"),
            ("drain: {deadline: soon}\n", "drain.deadline", "soon"),
            ("policy: {}\n", "policy", "names no policy set"),
            ("policy: {inbound: {dir: .}}\n", "policy.inbound", "no inbound listener"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2}\npolicy: {inbound: {dir: nowhere}}\n", "policy.inbound.dir", "not a directory"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2}\npolicy: {inbound: {dir: .}, decision_log: {max_bytes: 10}}\n", "policy.decision_log.max_bytes", "at least 4096"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2}\npolicy: {inbound: {dir: ., mode: audit}}\n", "policy.inbound.mode", "unknown field"),
            ("tracing: {sampling: 1.5}\n", "tracing.sampling", "from 0.0"),
            ("tracing: {sampling: -0.1}\n", "tracing.sampling", "out of range"),
            ("tracing: {sampling: .nan}\n", "tracing.sampling", "out of range"),
            ("tracing: {max_queue_size: 0}\n", "tracing.max_queue_size", "1 to 1048576"),
            ("tracing: {max_queue_size: 10, max_export_batch_size: 11}\n", "tracing.max_export_batch_size", "max_queue_size (10)"),
            ("tracing: {scheduled_delay: 0s}\n", "tracing.scheduled_delay", "is zero"),
            ("tracing: {otlp: {endpoint: \"jaeger:4318\"}}\n", "tracing.otlp.endpoint", "OTLP/HTTP traces URL"),
            ("tracing: {otlp: {endpoint: \"ftp://x/v1/traces\"}}\n", "tracing.otlp.endpoint", "not a plain http:// URL"),
            ("tracing: {otlp: {headers: {\"bad name\": x}}}\n", "tracing.otlp.headers.bad name", "valid HTTP header"),
            ("tracing: {sampler: 1}\n", "tracing.sampler", "unknown field"),
            ("tracing: {resource: {service.name: x}}\n", "tracing.resource.service.name", "tracing.service_name"),
            ("tracing: {resource: {crank.identity: x}}\n", "tracing.resource.crank.identity", "set by the proxy"),
            ("tracing: {otlp: {endpoint: \"https://x:4318/v1/traces\"}}\n", "tracing.otlp.endpoint", "OpenTelemetry Collector on loopback"),
            ("tracing: {otlp: {protocol: http/json}}\n", "tracing.otlp.protocol", "unknown variant"),
            ("quotas: {limits: [{tenant: a, capability: c, rate: 100/day}]}\n", "quotas.limits[0].rate", "N/s, N/min or N/h"),
            ("quotas: {limits: [{tenant: a, capability: c, rate: 0/s}]}\n", "quotas.limits[0].rate", "allows nothing"),
            ("quotas: {limits: [{tenant: a, capability: c, rate: 1/s, burst: 0}]}\n", "quotas.limits[0].burst", "at least 1"),
            ("quotas: {limits: [{tenant: a, capability: c, rate: 1/s, direction: sideways}]}\n", "quotas.limits[0].direction", "unknown variant"),
            ("quotas: {tenant_header: \"x y\"}\n", "quotas.tenant_header", "valid header name"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2, concurrency: {max_concurrent: 0}}\n", "inbound.concurrency.max_concurrent", "refuses every request"),
            ("inbound: {listen: 127.0.0.1:1, app: 127.0.0.1:2, idempotency: {ttl: 0s}}\n", "inbound.idempotency", "enabled: false"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], timeout: 0s}]\n", "routes[0].timeout", "is zero"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local, weight: 0}]}]\n", "routes[0].endpoints[0].weight", "not 1 to 1000000"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}, {address: 127.0.0.1:2, identity: b.t.crank.local, weight: 1000001}]}]\n", "routes[0].endpoints[1].weight", "not 1 to 1000000"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local, labels: {pool: [a]}}]}]\n", "routes[0].endpoints[0].labels.pool", "invalid type"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], retry: {attempts: 50}}]\n", "routes[0].retry.attempts", "0 to 10"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], retry: {on: [teapot]}}]\n", "routes[0].retry.on[0]", "unknown variant"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], retry: {backoff_base: 1s, backoff_max: 10ms}}]\n", "routes[0].retry.backoff_base", "backoff_max"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], circuit: {max_ejected_percent: 150}}]\n", "routes[0].circuit.max_ejected_percent", "over 100"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], fault: {abort: {percent: 101, status: 503}}}]\n", "routes[0].fault.abort.percent", "0 to 100"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], fault: {abort: {percent: 1, status: 200}}}]\n", "routes[0].fault.abort.status", "400 to 599"),
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], fault: {delay: {percent: -1, duration: 1s}}}]\n", "routes[0].fault.delay.percent", "0 to 100"),
        ];
        for (extra, field, needle) in cases {
            let e = check(extra).expect_err(extra);
            assert_eq!(e.file, "p.yaml");
            assert_eq!(e.field, *field, "{extra}: {e}");
            assert!(e.message.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn identity_modes_are_checked() {
        let d = dir_with_certs();
        let admin = "admin: {listen: 127.0.0.1:9901}\n";
        let en =
            "enroll: {control_plane: \"127.0.0.1:8443\", service: web, tenant: acme, state_dir: st";
        let ok = format!("identity: {{trust_bundle: bundle.pem, {en}}}}}\n{admin}");
        let cfg = parse("p.yaml", &ok).unwrap();
        validate("p.yaml", &cfg, d.path()).unwrap();
        let e = cfg.identity.enroll.as_ref().unwrap();
        assert_eq!(e.renew_at, 0.66);
        assert_eq!(e.watch_wait.as_secs(), 30);
        assert_eq!(e.trust_domain, "crank.local");
        assert_eq!(e.server_name(), "control.crank-system.crank.local");
        assert!(e.token_file.is_none());
        let cases: &[(&str, &str, &str)] = &[
            ("identity: {cert: a.crt, key: a.key, trust_bundle: bundle.pem, #}}\n", "identity.enroll", "not both"),
            ("identity: {trust_bundle: bundle.pem}\n", "identity", "neither cert and key nor enroll"),
            ("identity: {cert: a.crt, trust_bundle: bundle.pem}\n", "identity.key", "is missing"),
            ("identity: {key: a.key, trust_bundle: bundle.pem}\n", "identity.cert", "is missing"),
            ("identity: {trust_bundle: nope.pem, #}}\n", "identity.trust_bundle", "bootstrap bundle"),
            ("identity: {trust_bundle: bundle.pem, #, renew_at: 0.95}}\n", "identity.enroll.renew_at", "0.1 to 0.9"),
            ("identity: {trust_bundle: bundle.pem, #, renew_at: 0.05}}\n", "identity.enroll.renew_at", "out of range"),
            ("identity: {trust_bundle: bundle.pem, #, watch_wait: 90s}}\n", "identity.enroll.watch_wait", "1s to 60s"),
            ("identity: {trust_bundle: bundle.pem, #, watch_wait: 0s}}\n", "identity.enroll.watch_wait", "1s to 60s"),
            ("identity: {trust_bundle: bundle.pem, #, colour: red}}\n", "identity.enroll.colour", "unknown field"),
            ("identity: {trust_bundle: bundle.pem, enroll: {control_plane: nowhere, service: web, tenant: acme, state_dir: st}}\n", "identity.enroll.control_plane", "host:port"),
            ("identity: {trust_bundle: bundle.pem, enroll: {control_plane: \"h:1\", service: Web, tenant: acme, state_dir: st}}\n", "identity.enroll.service", "DNS label"),
            ("identity: {trust_bundle: bundle.pem, enroll: {control_plane: \"h:1\", tenant: acme, state_dir: st}}\n", "identity.enroll", "missing field `service`"),
        ];
        for (yaml, field, needle) in cases {
            let text = format!("{}{admin}", yaml.replace('#', en));
            let e = parse("p.yaml", &text)
                .and_then(|c| validate("p.yaml", &c, d.path()).map(|_| c))
                .expect_err(yaml);
            assert_eq!(e.field, *field, "{yaml}: {e}");
            assert!(e.message.contains(needle), "{yaml}: {e}");
        }
    }

    #[test]
    fn mesh_section_is_checked() {
        let d = dir_with_certs();
        std::fs::create_dir(d.path().join("pol")).unwrap();
        let id = "identity: {trust_bundle: bundle.pem, enroll: {control_plane: \"127.0.0.1:8443\", service: web, tenant: acme, state_dir: st}}\nadmin: {listen: 127.0.0.1:9901}\n";
        let inb = "inbound: {listen: 127.0.0.1:4143, app: 127.0.0.1:8080}\n";
        let run = |text: String| {
            parse("p.yaml", &text).and_then(|c| validate("p.yaml", &c, d.path()).map(|_| c))
        };
        let cfg = run(format!(
            "{id}{inb}mesh: {{register: {{capabilities: [hello:v1]}}}}\n"
        ))
        .unwrap();
        let m = cfg.mesh.as_ref().unwrap();
        assert_eq!(m.watch_wait.as_secs(), 30);
        assert_eq!(m.state_dir, None);
        let r = m.register.as_ref().unwrap();
        assert_eq!(r.lease.as_secs(), 10);
        assert_eq!(r.address, None);
        run(format!("{id}{inb}policy: {{inbound: {{dir: pol}}}}\nmesh: {{policy_dir: pol, watch_wait: 5s, state_dir: ms, register: {{address: \"10.0.0.7:4143\", from_file: shim.json, lease: 5m, labels: {{gpu: none}}}}}}\n")).unwrap();
        run(format!("{id}mesh: {{}}\n")).unwrap();
        let listen_any = "inbound: {listen: 0.0.0.0:4143, app: 127.0.0.1:8080}\n";
        let cases: &[(String, &str, &str)] = &[
            (
                format!("{BASE}mesh: {{}}\n"),
                "mesh",
                "needs identity.enroll",
            ),
            (
                format!("{id}mesh: {{watch_wait: 61s}}\n"),
                "mesh.watch_wait",
                "1s to 60s",
            ),
            (
                format!("{id}mesh: {{watch_wait: 0s}}\n"),
                "mesh.watch_wait",
                "1s to 60s",
            ),
            (
                format!("{id}mesh: {{colour: red}}\n"),
                "mesh.colour",
                "unknown field",
            ),
            (
                format!("{id}mesh: {{state_dir: \"\"}}\n"),
                "mesh.state_dir",
                "is empty",
            ),
            (
                format!(
                    "{id}{inb}policy: {{inbound: {{dir: pol}}}}\nmesh: {{policy_dir: other}}\n"
                ),
                "mesh.policy_dir",
                "policy.inbound.dir",
            ),
            (
                format!("{id}mesh: {{register: {{capabilities: [a]}}}}\n"),
                "mesh.register",
                "no inbound listener",
            ),
            (
                format!("{id}{listen_any}mesh: {{register: {{capabilities: [a]}}}}\n"),
                "mesh.register",
                "set mesh.register.address",
            ),
            (
                format!(
                    "{id}{inb}mesh: {{register: {{capabilities: [a], address: \"0.0.0.0:1\"}}}}\n"
                ),
                "mesh.register.address",
                "peers can dial",
            ),
            (
                format!("{id}{inb}mesh: {{register: {{capabilities: [a], lease: 500ms}}}}\n"),
                "mesh.register.lease",
                "1s to 5m",
            ),
            (
                format!("{id}{inb}mesh: {{register: {{capabilities: [a], lease: 6m}}}}\n"),
                "mesh.register.lease",
                "1s to 5m",
            ),
            (
                format!("{id}{inb}mesh: {{register: {{}}}}\n"),
                "mesh.register.capabilities",
                "from_file",
            ),
            (
                format!("{id}{inb}mesh: {{register: {{capabilities: [\"\"]}}}}\n"),
                "mesh.register.capabilities",
                "is empty",
            ),
            (
                format!("{id}{inb}mesh: {{register: {{capabilities: [a], ttl: 1s}}}}\n"),
                "mesh.register.ttl",
                "unknown field",
            ),
        ];
        for (text, field, needle) in cases {
            let e = run(text.clone()).expect_err(text);
            assert_eq!(e.field, *field, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn pushed_routes_may_have_no_endpoints_yet() {
        let d = dir_with_certs();
        let cfg = parse(
            "p.yaml",
            &format!("{BASE}routes: [{{name: b, endpoints: []}}]\n"),
        )
        .unwrap();
        assert!(validate("p.yaml", &cfg, d.path()).is_err());
        validate_pushed("mesh", &cfg, d.path()).unwrap();
    }

    #[test]
    fn missing_cert_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let cfg = parse("p.yaml", BASE).unwrap();
        let e = validate("p.yaml", &cfg, d.path()).unwrap_err();
        assert_eq!(e.field, "identity.cert");
        assert!(e.message.contains("crankctl cert issue"), "{e}");
    }
}
