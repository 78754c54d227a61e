//! Loading and validating `crank-proxy --config FILE.yaml`.
//!
//! The document is typed ([`crank_api::proxy::ProxyConfig`]), unknown keys are
//! rejected, and every error names the file, the field and the fix. A config
//! that fails validation is rejected whole.

pub mod capture;
mod checks;
pub mod egress;
mod mesh;
mod resilience;
mod tunnel;

use std::path::{Path, PathBuf};

use crank_api::proxy::ProxyConfig;

/// A refused config: which file, and every problem in it, each with its
/// field, what is wrong (with the bad value) and how to fix it; shown one
/// problem a line (crank-plumbing's type, shared by the three binaries).
pub use crank_plumbing::config::ConfigError;

/// `Ok` when there is no problem; otherwise all of them, in file order.
fn refuse_whole(file: &str, problems: Problems) -> Result<(), ConfigError> {
    let mut all = crank_plumbing::config::Problems::new(file);
    for (field, message) in problems {
        all.push(field, message);
    }
    all.finish()
}

/// Reads, parses and validates a proxy config file.
pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            &file,
            "(file)",
            format!("cannot read the config file: {e}; check the --config path"),
        )
    })?;
    let mut cfg = parse(&file, &text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    validate(&file, &cfg, base)?;
    egress::inline_cas(&mut cfg, base);
    Ok(cfg)
}

/// Parses YAML text. An error names the field once (serde_yaml's own
/// copy of the path is dropped), the line, the value found there and the fix.
pub fn parse(file: &str, text: &str) -> Result<ProxyConfig, ConfigError> {
    crank_plumbing::config::parse_yaml(file, text, "docs/reference/proxy-config.md")
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

/// Every problem of a config, `(field, message)`, in the order of the file.
type Problems = Vec<(String, String)>;

fn validate_with(
    file: &str,
    cfg: &ProxyConfig,
    base: &Path,
    pushed: bool,
) -> Result<(), ConfigError> {
    use checks::*;
    let mut p = Problems::new();
    validate_identity(&cfg.identity, base, &mut p);
    if cfg.threads == 0 || cfg.threads > 64 {
        p.push((
            "threads".into(),
            format!("{} is out of range; use 1 to 64", cfg.threads),
        ));
    }
    let names = validate_routes(cfg, pushed, &mut p);
    validate_listeners(cfg, &names, &mut p);
    if let Some(policy) = &cfg.policy {
        validate_policy(cfg, policy, base, &mut p);
    }
    if let Some(t) = &cfg.tracing {
        validate_tracing(t, &mut p);
    }
    resilience::validate_resilience(cfg, &mut p);
    validate_limits(&cfg.limits, &mut p);
    tunnel::validate_tunnel(cfg, &mut p);
    if let Some(m) = &cfg.mesh {
        mesh::validate_mesh(cfg, m, base, &mut p);
    }
    p.extend(egress::problems(cfg, base));
    if let Some(c) = &cfg.capture {
        p.extend(capture::problems(c));
    }
    refuse_whole(file, p)
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
            ("limits: {outbound_max_connections: 0}\n", "limits.outbound_max_connections", "refuses every connection"),
            ("limits: {request_head_timeout: 0s}\n", "limits.request_head_timeout", "is zero"),
            ("limits: {max_request_header_bytes: 10}\n", "limits.max_request_header_bytes", "1024 to 1048576"),
            ("limits: {max_connections: 5}\n", "limits.max_connections", "unknown field"),
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
            ("routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}], circuit: {failure_statuses: [502, 200]}}]\n", "routes[0].circuit.failure_statuses[1]", "not a 5xx"),
            ("limits: {idle_timeout: 0s}\n", "limits.idle_timeout", "is zero"),
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
    fn parse_errors_name_the_field_once_the_value_and_the_fix() {
        // (extra YAML, field, pieces the message must hold)
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "inbound: {listen: nope, app: 127.0.0.1:2}\n",
                "inbound.listen",
                &["invalid socket address", "found `nope` (line 3)", "ip:port"],
            ),
            (
                "inbound:\n  listen: \"localhost:80\"\n  app: 127.0.0.1:2\n",
                "inbound.listen",
                &[
                    "found `\"localhost:80\"` (line 4)",
                    "a host name is not allowed",
                ],
            ),
            (
                "drain: {deadline: soon} # later\n",
                "drain.deadline",
                &["found `soon` (line 3)", "250ms"],
            ),
            (
                "threads: many\n",
                "threads",
                &["invalid type", "found `many`"],
            ),
            (
                "bogus: 1\n",
                "bogus",
                &["unknown field `bogus`", "(line 3)", "remove it"],
            ),
        ];
        for (extra, field, pieces) in cases {
            let e = check(extra).expect_err(extra);
            assert_eq!(e.field, *field, "{extra}: {e}");
            for piece in *pieces {
                assert!(e.message.contains(piece), "{extra}: {piece}: {e}");
            }
            let shown = e.to_string();
            assert_eq!(
                shown.matches(&format!("{field}: ")).count(),
                1,
                "the field once: {shown}"
            );
            assert!(shown.starts_with(&format!("p.yaml: {field}: ")), "{shown}");
            assert!(!shown.contains(" at line "), "{shown}");
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let e = check(
            "threads: 0\n\
             inbound: {listen: 127.0.0.1:9901, app: 127.0.0.1:2}\n\
             routes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: nope, weight: 0}]}]\n\
             tracing: {sampling: 1.5}\n",
        )
        .unwrap_err();
        let fields: Vec<&str> = e.problems().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "threads",
                "routes[0].endpoints[0].identity",
                "routes[0].endpoints[0].weight",
                "inbound.listen",
                "tracing.sampling",
            ],
            "{e}"
        );
        let shown = e.to_string();
        assert!(shown.starts_with("p.yaml: 5 problems:\n"), "{shown}");
        assert_eq!(shown.lines().count(), 6, "{shown}");
        assert!(shown.lines().all(|l| l.starts_with("p.yaml: ")), "{shown}");
        assert!(shown.contains("\"nope\""), "{shown}");
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
        assert_eq!(m.report_interval.as_secs(), 10);
        assert_eq!(m.state_dir, None);
        let r = m.register.as_ref().unwrap();
        assert_eq!(r.lease.as_secs(), 10);
        assert_eq!(r.address, None);
        run(format!("{id}{inb}policy: {{inbound: {{dir: pol}}}}\nmesh: {{policy_dir: pol, watch_wait: 5s, state_dir: ms, register: {{address: \"10.0.0.7:4143\", from_file: shim.json, lease: 5m, labels: {{gpu: none}}}}}}\n")).unwrap();
        run(format!("{id}mesh: {{}}\n")).unwrap();
        run(format!("{id}mesh: {{report_interval: 0s}}\n")).unwrap();
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
                format!("{id}mesh: {{report_interval: 500ms}}\n"),
                "mesh.report_interval",
                "1s to 10m",
            ),
            (
                format!("{id}mesh: {{report_interval: 11m}}\n"),
                "mesh.report_interval",
                "1s to 10m",
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
