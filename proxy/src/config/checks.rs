//! Config checks of the sections that need no more than one look each:
//! routes, listeners, policy, limits, identity and enrollment, tracing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crank_api::proxy::ProxyConfig;
use crank_certs::Identity;

use super::{resolve, Problems};

/// Route names (returned, for the ports that name them), hosts, endpoints.
pub(super) fn validate_routes<'a>(
    cfg: &'a ProxyConfig,
    pushed: bool,
    p: &mut Problems,
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    let mut hosts: HashMap<String, &str> = HashMap::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        if r.name.is_empty() {
            p.push((
                format!("routes[{i}].name"),
                "is empty; name the route after its capability or service".into(),
            ));
        } else if !names.insert(r.name.as_str()) {
            p.push((
                format!("routes[{i}].name"),
                format!(
                    "route {:?} is defined twice; give each route a unique name",
                    r.name
                ),
            ));
        }
        if r.endpoints.is_empty() && !pushed && r.egress.is_none() {
            p.push((format!("routes[{i}].endpoints"), format!("route {:?} has no endpoints; add at least one peer sidecar address and identity", r.name)));
        }
        for h in std::iter::once(&r.name).chain(r.hosts.iter()) {
            let h = h.to_ascii_lowercase();
            if let Some(other) = hosts.insert(h.clone(), &r.name) {
                if other != r.name {
                    p.push((format!("routes[{i}].hosts"), format!("host {h:?} already selects route {other:?}; a host may select one route only")));
                }
            }
        }
        for (j, ep) in r.endpoints.iter().enumerate() {
            if let Err(e) = ep.identity.parse::<Identity>() {
                p.push((
                    format!("routes[{i}].endpoints[{j}].identity"),
                    e.to_string(),
                ));
            }
            if !(1..=1_000_000).contains(&ep.weight) {
                p.push((
                    format!("routes[{i}].endpoints[{j}].weight"),
                    format!("weight {} is not 1 to 1000000; the weight is the endpoint's share of the route's traffic relative to the other endpoints (default 1), to take an endpoint out remove it from the list", ep.weight),
                ));
            }
        }
    }
    names
}

/// Each listener on its own address; outbound ports name defined routes.
pub(super) fn validate_listeners(cfg: &ProxyConfig, names: &HashSet<&str>, p: &mut Problems) {
    let mut listens: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |addr: SocketAddr, field: String, p: &mut Problems| {
        if let Some(prev) = listens.insert(addr, field.clone()) {
            p.push((
                field,
                format!("{addr} is already used by {prev}; give each listener its own port"),
            ));
        }
    };
    claim(cfg.admin.listen, "admin.listen".into(), p);
    if let Some(inb) = &cfg.inbound {
        claim(inb.listen, "inbound.listen".into(), p);
    }
    if let Some(addr) = cfg.outbound.http_proxy {
        claim(addr, "outbound.http_proxy".into(), p);
    }
    for (i, port) in cfg.outbound.ports.iter().enumerate() {
        claim(port.listen, format!("outbound.ports[{i}].listen"), p);
        if !names.contains(port.route.as_str()) {
            let known: Vec<_> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
            p.push((
                format!("outbound.ports[{i}].route"),
                format!(
                    "route {:?} is not defined; define it under `routes` or use one of {known:?}",
                    port.route
                ),
            ));
        }
    }
}

/// The policy section: a set to check, a listener for it, real directories.
pub(super) fn validate_policy(
    cfg: &ProxyConfig,
    policy: &crank_api::proxy::PolicyConfig,
    base: &Path,
    p: &mut Problems,
) {
    if policy.inbound.is_none() && policy.outbound.is_none() {
        p.push((
            "policy".into(),
            "names no policy set; add policy.inbound.dir or policy.outbound.dir, or remove policy"
                .into(),
        ));
    }
    let inbound_capture = cfg
        .capture
        .as_ref()
        .is_some_and(|c| c.inbound_ports.is_some());
    if policy.inbound.is_some() && cfg.inbound.is_none() && !inbound_capture {
        p.push((
            "policy.inbound".into(),
            "this proxy has no inbound listener to check; add `inbound` or move the set to policy.outbound".into(),
        ));
    }
    if policy.outbound.is_some()
        && cfg.outbound.http_proxy.is_none()
        && cfg.outbound.ports.is_empty()
        && cfg.outbound.tcp.is_empty()
        && cfg.capture.is_none()
    {
        p.push((
            "policy.outbound".into(),
            "this proxy has no outbound listener to check; add outbound.http_proxy or outbound.ports, or remove it".into(),
        ));
    }
    for (field, src) in [
        ("policy.inbound.dir", &policy.inbound),
        ("policy.outbound.dir", &policy.outbound),
    ] {
        if let Some(src) = src {
            let d = resolve(base, &src.dir);
            if !d.is_dir() {
                p.push((
                    field.into(),
                    format!(
                        "{} is not a directory; point it at a directory of .rego files",
                        d.display()
                    ),
                ));
            }
        }
    }
    if policy.decision_log.max_bytes < 4096 {
        p.push((
            "policy.decision_log.max_bytes".into(),
            format!(
                "{} is too small; use at least 4096",
                policy.decision_log.max_bytes
            ),
        ));
    }
}

/// The listeners' connection caps, the head deadline, the header limit.
pub(super) fn validate_limits(l: &crank_api::proxy::LimitsConfig, p: &mut Problems) {
    for (field, n) in [
        (
            "limits.outbound_max_connections",
            l.outbound_max_connections,
        ),
        ("limits.inbound_max_connections", l.inbound_max_connections),
    ] {
        if n == 0 {
            p.push((
                field.into(),
                "is 0, which refuses every connection; use at least 1 (default 4096)".into(),
            ));
        }
    }
    if l.idle_timeout.is_zero() {
        p.push((
            "limits.idle_timeout".into(),
            "is zero, which closes every kept-alive connection at once; use a duration such as 60s"
                .into(),
        ));
    }
    if l.request_head_timeout.is_zero() {
        p.push((
            "limits.request_head_timeout".into(),
            "is zero, which closes every connection before its request; use a duration such as 10s"
                .into(),
        ));
    }
    if !(1024..=1 << 20).contains(&l.max_request_header_bytes) {
        p.push((
            "limits.max_request_header_bytes".into(),
            format!(
                "{} is out of range; use 1024 to 1048576 (Pingora reads at most 1 MiB of request head; default 61440)",
                l.max_request_header_bytes
            ),
        ));
    }
}

/// The identity section: exactly one of a static certificate (`cert` and
/// `key`) or `enroll`, readable files, enrollment settings in range.
pub(super) fn validate_identity(
    id: &crank_api::proxy::IdentityConfig,
    base: &Path,
    p: &mut Problems,
) {
    let readable = |field: &str, path: &Path, fix: &str, p: &mut Problems| {
        let full = resolve(base, path);
        if let Err(e) = std::fs::metadata(&full) {
            p.push((
                field.to_string(),
                format!("cannot read {}: {e}; {fix}", full.display()),
            ));
        }
    };
    let issue = "make it with `crankctl cert issue` or fix the path";
    match (&id.cert, &id.key, &id.enroll) {
        (Some(_), Some(_), Some(_)) | (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
            p.push(("identity.enroll".into(), "is set together with identity.cert/identity.key; use cert and key for a static certificate, or enroll to get one from crank-control, not both".into()))
        }
        (None, None, None) => p.push(("identity".into(), "has neither cert and key nor enroll; set identity.cert and identity.key (from `crankctl cert issue`), or identity.enroll to get a certificate from crank-control".into())),
        (Some(_), None, None) => p.push(("identity.key".into(), "is missing while identity.cert is set; add the key issued with that certificate".into())),
        (None, Some(_), None) => p.push(("identity.cert".into(), "is missing while identity.key is set; add the certificate issued with that key".into())),
        (Some(cert), Some(key), None) => {
            readable("identity.cert", cert, issue, p);
            readable("identity.key", key, issue, p);
            readable("identity.trust_bundle", &id.trust_bundle, issue, p);
        }
        (None, None, Some(e)) => {
            readable("identity.trust_bundle", &id.trust_bundle, "with identity.enroll it is the bootstrap bundle that verifies crank-control; copy the CA's bundle.pem (from `crankctl ca init`) there", p);
            validate_enroll(e, p);
        }
    }
}

pub(super) fn validate_enroll(e: &crank_api::proxy::EnrollConfig, p: &mut Problems) {
    let f = |name: &str| format!("identity.enroll.{name}");
    let addrs = e.control_plane.addresses();
    if addrs.is_empty() {
        p.push((
            f("control_plane"),
            "is an empty list; give crank-control's workload API address(es), e.g. [\"10.0.0.1:8443\", \"10.0.0.2:8443\"]".into(),
        ));
    }
    for (i, addr) in addrs.iter().enumerate() {
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            let field = if addrs.len() == 1 {
                f("control_plane")
            } else {
                format!("{}[{i}]", f("control_plane"))
            };
            p.push((
                field,
                format!(
                    "{addr:?} is not host:port; give crank-control's workload API address, e.g. 127.0.0.1:8443"
                ),
            ));
        }
    }
    if let Err(err) = Identity::new(&e.service, &e.tenant, &e.trust_domain) {
        p.push((
            f("service"),
            format!("service, tenant and trust_domain do not make an identity: {err}"),
        ));
    }
    if let Some(n) = &e.server_name {
        if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
            p.push((
                f("server_name"),
                format!(
                    "{n:?} is not a DNS name; leave it out for control.crank-system.<trust_domain>"
                ),
            ));
        }
    }
    if !(0.1..=0.9).contains(&e.renew_at) {
        p.push((
            f("renew_at"),
            format!(
                "{} is out of range; use a fraction of the certificate's lifetime from 0.1 to 0.9 (default 0.66)",
                e.renew_at
            ),
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&e.watch_wait) {
        p.push((
            f("watch_wait"),
            "is out of range; use 1s to 60s (default 30s)".into(),
        ));
    }
    if e.state_dir.as_os_str().is_empty() {
        p.push((
            f("state_dir"),
            "is empty; give a directory the proxy may write, e.g. /var/lib/crank/<service>".into(),
        ));
    }
}

/// The tracing section: numbers in range, an endpoint that is an http(s)
/// URL, headers that can be sent.
pub(super) fn validate_tracing(t: &crank_api::proxy::TracingConfig, p: &mut Problems) {
    if !(0.0..=1.0).contains(&t.sampling) {
        p.push((
            "tracing.sampling".into(),
            format!(
                "{} is out of range; use a share from 0.0 (no new traces) to 1.0 (all)",
                t.sampling
            ),
        ));
    }
    if !(1..=1 << 20).contains(&t.max_queue_size) {
        p.push((
            "tracing.max_queue_size".into(),
            format!(
                "{} is out of range; use 1 to 1048576 spans",
                t.max_queue_size
            ),
        ));
    }
    if t.max_export_batch_size == 0 || t.max_export_batch_size > t.max_queue_size {
        p.push((
            "tracing.max_export_batch_size".into(),
            format!(
                "{} is out of range; use 1 to max_queue_size ({})",
                t.max_export_batch_size, t.max_queue_size
            ),
        ));
    }
    if t.scheduled_delay.is_zero() {
        p.push((
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
            p.push((
                "tracing.otlp.endpoint".into(),
                format!(
                    "{ep:?} is not a plain http:// URL; use the collector's OTLP/HTTP traces URL (http://jaeger:4318/v1/traces) or gRPC address (http://jaeger:4317). For TLS to a remote collector, run an OpenTelemetry Collector on loopback"
                ),
            ));
        }
    }
    for k in t.resource.keys() {
        if k == "service.name" || k.starts_with("crank.") {
            p.push((
                format!("tracing.resource.{k}"),
                "is set by the proxy; use tracing.service_name for the service name, and leave crank.* attributes to the proxy".into(),
            ));
        }
    }
    for (k, v) in &t.otlp.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            p.push((
                format!("tracing.otlp.headers.{k}"),
                "is not a valid HTTP header name and value; use a token name and a printable ASCII value".into(),
            ));
        }
    }
}
