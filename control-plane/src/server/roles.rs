//! Roles of the remote admin API (`admin_listen`, mTLS): `roles.yaml` in
//! the mesh config directory binds identities (SPIFFE IDs or DNS names of
//! client certificates) to `viewer`, `operator` or `admin`, and each admin
//! route needs one of them. Over the Unix socket every caller has full
//! access (file permissions are its access control).

use std::collections::BTreeMap;

use crank_certs::Identity;
use serde::{Deserialize, Serialize};

/// A role; each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: status, certificates, mesh views, audit, OpenAPI, metrics.
    Viewer,
    /// Viewer, plus join tokens and revocation.
    Operator,
    /// Everything, CA rotation included.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// `roles.yaml`: `roles: {admin: [...], operator: [...], viewer: [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesFile {
    #[serde(default)]
    pub roles: RoleBindings,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBindings {
    #[serde(default)]
    pub admin: Vec<String>,
    #[serde(default)]
    pub operator: Vec<String>,
    #[serde(default)]
    pub viewer: Vec<String>,
}

impl RolesFile {
    fn bindings(&self) -> [(Role, &Vec<String>); 3] {
        [
            (Role::Admin, &self.roles.admin),
            (Role::Operator, &self.roles.operator),
            (Role::Viewer, &self.roles.viewer),
        ]
    }

    /// The highest role bound to `id` (by SPIFFE ID or DNS name).
    pub fn role_of(&self, id: &Identity) -> Option<Role> {
        self.bindings()
            .into_iter()
            .find(|(_, ids)| ids.iter().any(|i| i.parse::<Identity>().as_ref() == Ok(id)))
            .map(|(r, _)| r)
    }

    /// Problems as `(field, message)`: identities that are neither a SPIFFE
    /// ID nor a DNS name, and identities bound twice.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (role, ids) in self.bindings() {
            for (i, raw) in ids.iter().enumerate() {
                let field = format!("roles.{}[{i}]", role.as_str());
                match raw.parse::<Identity>() {
                    Err(e) => out.push((field, format!("{raw:?} is not an identity ({e}); write a SPIFFE ID (spiffe://<trust-domain>/tenant/<tenant>/svc/<service>) or a DNS name (<service>.<tenant>.<trust-domain>) as `crank-certs identity` prints it"))),
                    Ok(id) => {
                        if let Some(first) = seen.insert(id.dns_name(), field.clone()) {
                            out.push((field, format!("{raw} is already bound at {first}; bind each identity to one role (roles include the ones below them)")));
                        }
                    }
                }
            }
        }
        out
    }
}

/// The role an admin route needs: GETs are `viewer`, tokens and
/// revocation `operator`, everything else (rotation) `admin`.
pub fn required(method: &str, path: &str) -> Role {
    match (method, path) {
        ("GET", _) => Role::Viewer,
        ("POST", "/v1/admin/tokens" | "/v1/admin/revoke") => Role::Operator,
        _ => Role::Admin,
    }
}

/// The refusal message for `seen` (its role, if any) lacking `need`.
pub fn refusal_message(need: Role, seen: &str, has: Option<Role>) -> String {
    let has = has.map_or("no role".to_string(), |r| format!("role {}", r.as_str()));
    let roles = match need {
        Role::Viewer => "viewer, operator or admin",
        Role::Operator => "operator or admin",
        Role::Admin => "admin",
    };
    format!("this call needs role {} ({roles}); the client certificate is {seen}, which has {has}; add it under roles.{} in roles.yaml of the mesh config directory", need.as_str(), need.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> RolesFile {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn an_identity_gets_its_highest_role_by_spiffe_id_or_dns_name() {
        let f = file("roles:\n  admin: [spiffe://mesh.local/tenant/ops/svc/alice]\n  operator: [bob.ops.mesh.local]\n  viewer: [carol.ops.mesh.local]\n");
        let id = |s: &str| Identity::new(s, "ops", "mesh.local").unwrap();
        assert_eq!(f.role_of(&id("alice")), Some(Role::Admin));
        assert_eq!(f.role_of(&id("bob")), Some(Role::Operator));
        assert_eq!(f.role_of(&id("carol")), Some(Role::Viewer));
        assert_eq!(f.role_of(&id("mallory")), None);
        let other_td = Identity::new("alice", "ops", "other.local").unwrap();
        assert_eq!(f.role_of(&other_td), None);
        assert!(f.problems().is_empty(), "{:?}", f.problems());
    }

    #[test]
    fn routes_need_viewer_operator_or_admin() {
        assert_eq!(required("GET", "/v1/admin/audit"), Role::Viewer);
        assert_eq!(required("GET", "/v1/admin/certs"), Role::Viewer);
        assert_eq!(required("POST", "/v1/admin/revoke"), Role::Operator);
        assert_eq!(required("POST", "/v1/admin/tokens"), Role::Operator);
        assert_eq!(required("POST", "/v1/admin/rotate"), Role::Admin);
        assert_eq!(required("DELETE", "/anything"), Role::Admin);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn bad_and_duplicate_identities_are_problems_naming_the_field() {
        let f = file("roles:\n  admin: [alice.ops.mesh.local]\n  viewer: [not an id, spiffe://mesh.local/tenant/ops/svc/alice]\n");
        let p = f.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "roles.viewer[0]");
        assert!(p[0].1.contains("is not an identity"));
        assert_eq!(p[1].0, "roles.viewer[1]");
        assert!(p[1].1.contains("already bound at roles.admin[0]"));
    }

    #[test]
    fn the_refusal_names_the_role_needed_the_identity_and_the_fix() {
        let m = refusal_message(Role::Operator, "bob.ops.mesh.local", Some(Role::Viewer));
        assert!(m.contains("needs role operator"), "{m}");
        assert!(
            m.contains("bob.ops.mesh.local, which has role viewer"),
            "{m}"
        );
        assert!(m.contains("roles.operator in roles.yaml"), "{m}");
        assert!(refusal_message(Role::Admin, "x", None).contains("which has no role"));
    }
}
