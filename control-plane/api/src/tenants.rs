//! `tenants.yaml` in the mesh config directory: each tenant's share of the
//! job workers and its quotas on the shared job queue. Checked by `crankctl
//! check`/`config validate` with the rest of the directory, and read by the
//! worker shims from `exec.queue.tenants`.
//!
//! ```yaml
//! tenants:
//!   - {name: acme, weight: 3, max_running: 4, max_queued: 100}
//!   - {name: "*", weight: 1}          # everyone else, each on their own
//! ```

use serde::{Deserialize, Serialize};

/// `tenants.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    #[serde(default)]
    pub tenants: Vec<TenantSpec>,
}

/// One tenant's share and quotas; `name: "*"` applies to every tenant not
/// listed (each counted on its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    /// Share of the workers within a priority, against other tenants'.
    #[serde(default = "one")]
    pub weight: f64,
    /// Jobs of this tenant running at once, cluster-wide (per capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    /// Jobs of this tenant waiting; more are refused with 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
}

fn one() -> f64 {
    1.0
}

impl TenantsFile {
    /// Every problem: (field, message naming the fix).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.tenants.iter().enumerate() {
            let at = |f: &str| format!("tenants[{i}].{f}");
            if s.name.is_empty() || !(s.name == "*" || valid_name(&s.name)) {
                p.push((
                    at("name"),
                    format!(
                        "{:?} must be a tenant name (letters, digits, - and _) or \"*\"",
                        s.name
                    ),
                ));
            }
            if !seen.insert(&s.name) {
                p.push((
                    at("name"),
                    format!("{:?} is listed twice; keep one", s.name),
                ));
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                p.push((at("weight"), "must be more than 0, like 1 or 2.5".into()));
            }
            if s.max_queued == Some(0) {
                p.push((
                    at("max_queued"),
                    "is 0: every submission would be refused; remove it or give at least 1".into(),
                ));
            }
            if s.max_running == Some(0) {
                p.push((
                    at("max_running"),
                    "is 0: no job would ever start; remove it or give at least 1".into(),
                ));
            }
        }
        p
    }
}

fn valid_name(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
