//! `crank-control`'s own config file (`control.yaml`): listeners, state
//! directory, the intermediate that seeds the CA, and certificate, token and
//! workload limits. Typed, `deny_unknown_fields`, every error names the
//! file, the field and the fix; relative paths resolve against the file's
//! directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_plumbing::config::Problems;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Workload API (TLS; a client certificate is required for renew and watch).
    pub listen: SocketAddr,
    /// Where `crankctl` connects: a Unix socket made with mode 0600.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// The admin API over mTLS (client certificates from the mesh CA; the
    /// role of each identity comes from `roles.yaml` in `config_dir`).
    /// Absent: the admin API is only on `admin_socket`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus `/metrics` (plain HTTP). Absent: metrics only on the admin socket.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The web dashboard (plain HTTP, read-only, no authentication: keep it
    /// on loopback or a trusted network). Absent: no dashboard.
    #[serde(default)]
    pub dashboard_listen: Option<SocketAddr>,
    /// `state.json` (CA generations, tokens (hashed), inventory, deny list,
    /// rotation) and `bundle.pem` (the current roots) live here.
    pub state_dir: PathBuf,
    pub ca: CaSeed,
    #[serde(default)]
    pub certs: CertLimits,
    #[serde(default)]
    pub tokens: TokenLimits,
    #[serde(default)]
    pub workloads: WorkloadSettings,
    /// The mesh config directory (capabilities.yaml, routes/, quotas.yaml,
    /// slo/, policies/), watched (a saved edit publishes at once) and
    /// checked every half second, and pushed to proxies.
    /// Absent: crank-control is only the CA.
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
    #[serde(default)]
    pub registry: RegistrySettings,
    /// Where the state that must survive a replica lives (`file`, the
    /// default, or `etcd`); see docs/reference/control-config.md.
    #[serde(default)]
    pub store: crate::store::StoreSettings,
    /// The key-encryption key (32 bytes, mode 0600) that seals intermediate
    /// private keys in the store; required with `store: {etcd: ...}`, the
    /// same file on every replica.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// With `store: {etcd: ...}`: how long a dead leader keeps the role
    /// before another replica takes over (publishing, rotation, pruning).
    #[serde(with = "humantime_serde", default = "default_leader_ttl")]
    pub leader_ttl: Duration,
}

fn default_leader_ttl() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Lease of a registration that asks for none: an endpoint whose
    /// heartbeats stop leaves every route after this long (dead worker
    /// detection).
    #[serde(with = "humantime_serde", default = "default_lease")]
    pub lease: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            lease: default_lease(),
        }
    }
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// The intermediate that signs, used only when `state_dir` holds no CA yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSeed {
    /// A directory written by `crankctl ca intermediate` (ca.crt, ca.key, bundle.pem).
    pub intermediate: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertLimits {
    #[serde(with = "humantime_serde", default = "default_leaf_ttl")]
    pub leaf_ttl: Duration,
    #[serde(with = "humantime_serde", default = "default_max_leaf_ttl")]
    pub max_leaf_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLimits {
    #[serde(with = "humantime_serde", default = "default_token_ttl")]
    pub default_ttl: Duration,
    #[serde(with = "humantime_serde", default = "default_max_leaf_ttl")]
    pub max_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSettings {
    /// A workload not seen for this long no longer holds back a rotation
    /// (it is listed as stale in `crankctl ca status`).
    #[serde(with = "humantime_serde", default = "default_stale_after")]
    pub stale_after: Duration,
}

impl Default for CertLimits {
    fn default() -> Self {
        CertLimits {
            leaf_ttl: default_leaf_ttl(),
            max_leaf_ttl: default_max_leaf_ttl(),
        }
    }
}
impl Default for TokenLimits {
    fn default() -> Self {
        TokenLimits {
            default_ttl: default_token_ttl(),
            max_ttl: default_max_leaf_ttl(),
        }
    }
}
impl Default for WorkloadSettings {
    fn default() -> Self {
        WorkloadSettings {
            stale_after: default_stale_after(),
        }
    }
}

fn default_trust_domain() -> String {
    crank_certs::DEFAULT_TRUST_DOMAIN.into()
}
fn default_admin_socket() -> PathBuf {
    "state/admin.sock".into()
}
fn default_leaf_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_leaf_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_stale_after() -> Duration {
    Duration::from_secs(600)
}

pub use crank_plumbing::config::ConfigError;

/// Where parse errors point to.
const DOC: &str = "docs/reference/control-config.md";

/// Reads, parses and checks `path`; relative paths become absolute against
/// the file's directory.
pub fn load(path: &Path) -> Result<ControlConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
    let mut cfg = parse(&file, &text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    crank_plumbing::config::resolve_paths(
        base,
        [
            &mut cfg.admin_socket,
            &mut cfg.state_dir,
            &mut cfg.ca.intermediate,
        ]
        .into_iter()
        .chain(cfg.config_dir.as_mut())
        .chain(cfg.kek_file.as_mut())
        .chain(cfg.store.paths_mut()),
    );
    Ok(cfg)
}

/// Parses and checks the YAML text of a control config; a config with
/// problems is refused whole, every problem listed.
pub fn parse(file: &str, text: &str) -> Result<ControlConfig, ConfigError> {
    let cfg: ControlConfig = crank_plumbing::config::parse_yaml(file, text, DOC)?;
    let mut p = Problems::new(file);
    p.check(
        "trust_domain",
        crank_certs::Identity::new("x", "x", &cfg.trust_domain)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
    check_lifetimes(&cfg, &mut p);
    cfg.store.check(&mut p);
    check_ha(&cfg, &mut p);
    if let Err((field, m)) = check_listeners(&cfg) {
        p.push(field, m);
    }
    p.finish()?;
    Ok(cfg)
}

/// Certificate, token, lease and staleness times.
fn check_lifetimes(cfg: &ControlConfig, p: &mut Problems) {
    let c = &cfg.certs;
    if c.leaf_ttl < Duration::from_secs(10) {
        p.push(
            "certs.leaf_ttl",
            "is under 10s; leaves must live long enough to be renewed (24h is the default)",
        );
    } else if c.leaf_ttl > c.max_leaf_ttl {
        p.push(
            "certs.leaf_ttl",
            format!(
                "{} is over certs.max_leaf_ttl ({}); lower it or raise the maximum",
                humantime::format_duration(c.leaf_ttl),
                humantime::format_duration(c.max_leaf_ttl)
            ),
        );
    }
    let t = &cfg.tokens;
    if t.default_ttl.is_zero() || t.default_ttl > t.max_ttl {
        p.push(
            "tokens.default_ttl",
            "must be above zero and at most tokens.max_ttl",
        );
    }
    let lease = cfg.registry.lease;
    if lease < Duration::from_secs(1) || lease > Duration::from_secs(300) {
        p.push("registry.lease", "must be 1s to 5m (10s is the default)");
    }
    if cfg.workloads.stale_after < Duration::from_secs(1) {
        p.push("workloads.stale_after", "is under 1s");
    }
}

/// `kek_file` and `leader_ttl` go with `store: {etcd: ...}`.
fn check_ha(cfg: &ControlConfig, p: &mut Problems) {
    let etcd = matches!(cfg.store, crate::store::StoreSettings::Etcd(_));
    if etcd && cfg.kek_file.is_none() {
        p.push(
            "kek_file",
            "is required with store: {etcd: ...}: intermediate keys are sealed under it in etcd; make one with `head -c 32 /dev/urandom > kek && chmod 600 kek` and give every replica the same file",
        );
    }
    let ttl = cfg.leader_ttl;
    if ttl < Duration::from_secs(2) || ttl > Duration::from_secs(60) {
        p.push("leader_ttl", "must be 2s to 60s (5s is the default)");
    }
}

/// The TCP listeners must not share an address (the second bind would fail).
fn check_listeners(cfg: &ControlConfig) -> Result<(), (&'static str, String)> {
    let mut seen = vec![("listen", cfg.listen)];
    for (field, addr) in [
        ("metrics_listen", cfg.metrics_listen),
        ("dashboard_listen", cfg.dashboard_listen),
        ("admin_listen", cfg.admin_listen),
    ] {
        let Some(addr) = addr else { continue };
        if let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr && addr.port() != 0) {
            return Err((
                field,
                format!("{addr} is also {other}; give each listener its own port"),
            ));
        }
        seen.push((field, addr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen: 127.0.0.1:8443\nstate_dir: state\nca: {intermediate: ca/int}\n";

    #[test]
    fn crank_api_copies_the_default_trust_domain() {
        assert_eq!(
            crank_api::proxy::DEFAULT_TRUST_DOMAIN,
            crank_certs::DEFAULT_TRUST_DOMAIN
        );
    }

    #[test]
    fn defaults() {
        let c = parse("c.yaml", BASE).unwrap();
        assert_eq!(c.trust_domain, "crank.local");
        assert_eq!(c.certs.leaf_ttl, Duration::from_secs(86400));
        assert_eq!(c.certs.max_leaf_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.tokens.default_ttl, Duration::from_secs(3600));
        assert_eq!(c.workloads.stale_after, Duration::from_secs(600));
        assert_eq!(c.dashboard_listen, None);
        let c = parse(
            "c.yaml",
            &format!("{BASE}dashboard_listen: 127.0.0.1:9480\n"),
        )
        .unwrap();
        assert_eq!(c.dashboard_listen, Some("127.0.0.1:9480".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("bogus: 1\n", "bogus", "unknown field"),
            ("certs: {leaf_ttl: 8d}\n", "certs.leaf_ttl", "max_leaf_ttl"),
            ("certs: {leaf_ttl: 1s}\n", "certs.leaf_ttl", "under 10s"),
            (
                "tokens: {default_ttl: 30d}\n",
                "tokens.default_ttl",
                "max_ttl",
            ),
            ("trust_domain: Not_Valid\n", "trust_domain", "trust domain"),
            (
                "dashboard_listen: 127.0.0.1:8443\n",
                "dashboard_listen",
                "also listen",
            ),
            (
                "metrics_listen: 127.0.0.1:9470\ndashboard_listen: 127.0.0.1:9470\n",
                "dashboard_listen",
                "also metrics_listen",
            ),
            (
                "dashboard_listen: localhost\n",
                "dashboard_listen",
                "socket address",
            ),
        ];
        for (extra, field, msg) in cases {
            let e = parse("c.yaml", &format!("{BASE}{extra}")).unwrap_err();
            assert!(e.field.contains(field), "{extra}: {e}");
            assert!(e.to_string().contains(msg), "{extra}: {e}");
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let extra = "certs: {leaf_ttl: 1s}\nregistry: {lease: 10m}\nworkloads: {stale_after: 0s}\n";
        let e = parse("c.yaml", &format!("{BASE}{extra}")).unwrap_err();
        let fields: Vec<_> = e.problems().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["certs.leaf_ttl", "registry.lease", "workloads.stale_after"]
        );
        assert!(e.to_string().starts_with("c.yaml: 3 problems:\n"), "{e}");
    }
}
