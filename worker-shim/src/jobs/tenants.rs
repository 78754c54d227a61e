//! Tenants of the job queue: who a caller is (the tenant segment of the
//! mesh identity the sidecar passes in `x-crank-client-id`, never a body
//! field), and each tenant's weight and quotas from `tenants.yaml` (the
//! mesh config directory's file, read by the shim from
//! `exec.queue.tenants` at start and again when it changes:
//! `tenants_reload`).
//!
//! ```yaml
//! tenants:
//!   - {name: acme, weight: 3, max_running: 4, max_queued: 100}
//!   - {name: "*", weight: 1}          # everyone else, each on their own
//! ```

use std::collections::BTreeMap;
use std::path::Path;

/// The tenant of a caller without a mesh identity (no sidecar in between).
pub const ANONYMOUS: &str = "anonymous";

pub use crank_api::tenants::{TenantSpec, TenantsFile};

/// The checked file: every tenant by name, and the default.
#[derive(Debug, Clone)]
pub struct Tenants {
    named: BTreeMap<String, TenantSpec>,
    default: TenantSpec,
}

impl Default for Tenants {
    fn default() -> Self {
        Tenants {
            named: BTreeMap::new(),
            default: TenantSpec {
                name: "*".into(),
                weight: 1.0,
                max_running: None,
                max_queued: None,
            },
        }
    }
}

impl Tenants {
    /// Reads and checks `tenants.yaml`; the error names the file, the entry
    /// and the fix.
    pub fn load(path: &Path) -> Result<Tenants, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
        let file: TenantsFile =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Tenants::new(file).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn new(file: TenantsFile) -> Result<Tenants, String> {
        let problems = check(&file);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let mut t = Tenants::default();
        for spec in file.tenants {
            if spec.name == "*" {
                t.default = spec;
            } else {
                t.named.insert(spec.name.clone(), spec);
            }
        }
        Ok(t)
    }

    /// The spec that applies to `tenant`.
    pub fn get(&self, tenant: &str) -> &TenantSpec {
        self.named.get(tenant).unwrap_or(&self.default)
    }

    /// Named tenants as parallel arrays (name, weight, max running; -1 for
    /// none), for the claim query.
    pub fn arrays(&self) -> (Vec<String>, Vec<f64>, Vec<i64>) {
        let mut names = Vec::new();
        let mut weights = Vec::new();
        let mut max = Vec::new();
        for s in self.named.values() {
            names.push(s.name.clone());
            weights.push(s.weight);
            max.push(s.max_running.map_or(-1, i64::from));
        }
        (names, weights, max)
    }

    pub fn default_spec(&self) -> &TenantSpec {
        &self.default
    }
}

/// Every problem of the file, each naming the entry and the fix.
pub fn check(file: &TenantsFile) -> Vec<String> {
    file.problems()
        .into_iter()
        .map(|(field, message)| format!("{field} {message}"))
        .collect()
}

/// The tenant of a verified mesh identity: `spiffe://TD/tenant/T/svc/S`
/// gives `T`; the DNS form `svc.T.td` gives `T`; no identity gives
/// [`ANONYMOUS`].
pub fn tenant_of(identity: Option<&str>) -> String {
    let Some(id) = identity.filter(|s| !s.is_empty()) else {
        return ANONYMOUS.into();
    };
    if let Some(path) = id.strip_prefix("spiffe://") {
        let segs: Vec<&str> = path.split('/').collect();
        if let Some(i) = segs.iter().position(|s| *s == "tenant") {
            if let Some(t) = segs.get(i + 1).filter(|t| !t.is_empty()) {
                return t.to_string();
            }
        }
        return ANONYMOUS.into();
    }
    match id.split('.').nth(1) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => ANONYMOUS.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_comes_from_the_identity() {
        let cases = [
            (Some("spiffe://crank.local/tenant/acme/svc/api"), "acme"),
            (Some("spiffe://crank.local/tenant/b-2/svc/x"), "b-2"),
            (Some("spiffe://crank.local/svc/x"), ANONYMOUS),
            (Some("api.acme.crank.local"), "acme"),
            (Some(""), ANONYMOUS),
            (None, ANONYMOUS),
        ];
        for (id, want) in cases {
            assert_eq!(tenant_of(id), want, "{id:?}");
        }
    }

    #[test]
    fn named_tenants_and_the_default_apply() {
        let file: TenantsFile = serde_yaml::from_str(
            "tenants:\n  - {name: acme, weight: 3, max_running: 2, max_queued: 5}\n  - {name: '*', max_queued: 50}\n",
        )
        .unwrap();
        let t = Tenants::new(file).unwrap();
        assert_eq!(t.get("acme").max_running, Some(2));
        assert_eq!(t.get("other").max_queued, Some(50));
        assert_eq!(t.get("other").weight, 1.0);
        assert_eq!(t.arrays(), (vec!["acme".to_string()], vec![3.0], vec![2]));
    }

    #[test]
    fn bad_entries_are_named_with_the_fix() {
        let file: TenantsFile = serde_yaml::from_str(
            "tenants:\n  - {name: 'a b', weight: 0}\n  - {name: x, max_queued: 0}\n  - {name: x}\n",
        )
        .unwrap();
        let p = check(&file);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].contains("tenants[0].name"));
        assert!(p[1].contains("tenants[0].weight"));
        assert!(p[2].contains("tenants[1].max_queued"));
        assert!(p[3].contains("listed twice"));
        assert!(serde_yaml::from_str::<TenantsFile>("tenants: [{name: a, wieght: 2}]").is_err());
    }
}
